"""Does a calibration still hold? The transfer table: a shipped file applied to another model or call, its measured
loss against a refit at equal compute, and what ``calib check`` said.

    python benchmarks/validity.py [--cases base,lora,...] [--seeds 1000,1001] [--json out.json]

For each case (a shipped coefficient file, the model and call it is served on):

1. ``calib check FILE --model M [call] --json`` is run as a user runs it (its own process), and its verdict kept.
2. The file is served as it is (the runtime at its recommended threshold) on held-out prompts x seeds of the case's
   call: its measured fraction of full forwards and final-latent rel-L1 against the uncached run of the same prompt
   and seed.
3. A refit: the case's call traced on calibration seeds (the bundled prompts x ``--calib-seeds``), a TeaCache file
   fitted as ``calib fit`` fits it (the file's indicator and normalisation, degree auto), served on the same held-out
   generations over a threshold grid; its error at the file's measured fraction is interpolated per generation.
4. The measured loss: the file's error less the refit's at equal compute, paired by prompt and seed. The file
   *holds by measurement* when that excess is at most twice its standard error over the generations, or when the file
   computes no more than calibrated and is no worse than the refit. When check said *retune*, its threshold is served
   too and must hold by the same rule. The verdict agrees with the measurement when: *holds* -> the file holds;
   *retune* -> the file does not hold but the retuned threshold does; *refit* -> neither the file nor (where measured)
   the retuned threshold holds, or the refit itself recommends no cache (few steps).

Traces for the refits are cached like the other fitting benchmarks (CALIB_BENCH_CACHE); a cold run of every case
takes about 20 minutes on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _common import DEFAULT_CACHE, load_builtin, log, markdown_table, write_json

ROOT = Path(__file__).resolve().parent.parent
GRID = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.6)


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    coeffs: str  # a shipped file, relative to the repository
    model: str
    call: dict = field(default_factory=dict)  # the call fields that differ from the file's: steps, guidance, ...


CASES = [
    Case("base", "calibrated model and call", "coeffs/digits.json", "builtin:digits"),
    Case("lora", "a LoRA (bold strokes) of the model", "coeffs/digits.json", "builtin:digits-lora"),
    Case("steps-20", "20 steps instead of 30", "coeffs/digits.json", "builtin:digits", {"steps": 20}),
    Case("steps-50", "50 steps instead of 30", "coeffs/digits.json", "builtin:digits", {"steps": 50}),
    Case("guidance-6", "guidance 6 instead of 3", "coeffs/digits.json", "builtin:digits", {"guidance": 6.0}),
    Case("guidance-1.5", "guidance 1.5 instead of 3", "coeffs/digits.json", "builtin:digits", {"guidance": 1.5}),
    Case("fewstep-4", "the 4-step distilled model at 4 steps", "coeffs/digits.json", "builtin:digits-4step",
         {"steps": 4}),
    Case("wan-base", "calibrated model and call", "coeffs/wan-digits.json", "builtin:wan-digits"),
    Case("wan-frames-8", "8 frames instead of 4", "coeffs/wan-digits.json", "builtin:wan-digits", {"num_frames": 8}),
    Case("wan-16x16", "a 16x16 canvas instead of 12x12", "coeffs/wan-digits.json", "builtin:wan-digits",
         {"height": 16, "width": 16}),
]

CLI_FLAGS = {"steps": "--steps", "guidance": "--guidance", "height": "--height", "width": "--width",
             "num_frames": "--num-frames"}


def _env() -> dict:
    """calib from this checkout, whatever is installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_check(case: Case, generations: int) -> dict:
    """``calib check`` in its own process, as a user or a CI job runs it; its JSON object."""
    args = [sys.executable, "-m", "calib", "check", str(ROOT / case.coeffs), "--model", case.model, "--json",
            "--generations", str(generations)]
    for key, value in case.call.items():
        args += [CLI_FLAGS[key], str(value)]
    done = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=ROOT)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"calib check on {case.name} printed no JSON (exit {done.returncode}): "
                         f"{done.stderr.strip().splitlines()[-1:]}")
    if result.get("exit_code") != done.returncode:
        raise SystemExit(f"calib check on {case.name}: exit status {done.returncode}, JSON says {result.get('exit_code')}")
    return result


def file_call(doc: dict) -> dict:
    """The call a document was calibrated on: steps, guidance and the pipeline's size arguments."""
    cal = doc.get("calibration") or {}
    pipe_call = cal.get("pipeline") or {}
    call = {"steps": int(cal["steps"][0]), "guidance": float(cal["guidance"][0])}
    for key in ("height", "width", "num_frames"):
        if pipe_call.get(key) is not None:
            call[key] = pipe_call[key]
    return call


class Served:
    """Held-out generations of one call on one pipeline: the uncached final latents, and cached runs of any config."""

    def __init__(self, pipe, prompts, seeds, call):
        from calib.trace.generate import Generator

        self.pipe = pipe
        self.jobs = [(p, s) for p in prompts for s in seeds]
        kwargs = {k: v for k, v in call.items() if k in ("height", "width", "num_frames")}
        self.generator = Generator(pipe, steps=call["steps"], guidance=call["guidance"], pipeline_kwargs=kwargs,
                                   output_type="latent", purpose="benchmarks/validity")
        self.uncached = [self.generator(p, s).latents for p, s in self.jobs]

    def run(self, config, threshold) -> dict:
        """Per generation: the fraction of full forwards and the final-latent rel-L1 against the uncached run."""
        import calib.runtime as cr
        from calib.evaluate.metrics import latent_rel_l1

        fractions, errors = [], []
        for (prompt, seed), reference in zip(self.jobs, self.uncached):
            # The runtime's warnings about another call than calibrated are what this benchmark is about: said
            # by calib check, not once per generation here.
            with warnings.catch_warnings(), cr.apply(self.pipe, config, threshold=threshold) as handle:
                warnings.simplefilter("ignore")
                latents = self.generator(prompt, seed).latents
                fractions.append(float(handle.stats()["compute_fraction"]))
            errors.append(latent_rel_l1(reference, latents))
        return {"threshold": float(threshold), "fractions": fractions, "errors": errors,
                "fraction": float(np.mean(fractions)), "error": float(np.mean(errors))}


def refit(case: Case, call: dict, prompts, calib_seeds, cache: Path, pipe):
    """What a user gets by refitting: the case's call traced on ``prompts x calib_seeds`` (calib's tracer) and
    ``calib fit`` run on it in its own process with its defaults; the runtime config and the document."""
    import calib.runtime as cr
    from calib.methods.registry import load_document

    trace_path = traced_call(case.model, prompts, calib_seeds, call, cache, pipe)
    out = trace_path.with_suffix(".json")
    if not out.exists():
        done = subprocess.run([sys.executable, "-m", "calib", "fit", str(trace_path), "--out", str(out)],
                              capture_output=True, text=True, env=_env(), cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"calib fit on {case.name}'s traces failed: {done.stderr.strip().splitlines()[-1:]}")
    return cr.load(out), load_document(out)


def traced_call(model, prompts, seeds, call, cache: Path, pipe):
    """The case's call traced on ``prompts x seeds`` with calib's tracer, kept in ``cache`` as a trace file."""
    import hashlib

    from calib.store import TraceWriter
    from calib.trace import Tracer, TraceSettings, describe_model

    key = hashlib.sha256(json.dumps([model, prompts, list(seeds), call], sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache) / f"validity-{model.replace(':', '_')}-{key}.h5"
    if path.exists():
        return path
    settings = TraceSettings(steps=call["steps"], guidance=call["guidance"], seeds=tuple(seeds),
                             height=call.get("height"), width=call.get("width"), num_frames=call.get("num_frames"),
                             record_blocks=False)
    tracer = Tracer(pipe, record_blocks=False)
    try:
        info = describe_model(pipe, model, tracer.adapter)
        trajectories = []
        for prompt in prompts:
            for seed in seeds:
                trajectories += tracer.trace(prompt, seed, settings)
    finally:
        tracer.remove()
    path.parent.mkdir(parents=True, exist_ok=True)
    with TraceWriter(path, info, overwrite=True) as writer:
        writer.append(trajectories)
    return path


def at_fraction(sweep: list[dict], fraction: float) -> np.ndarray | None:
    """Per generation, the refit's error interpolated at ``fraction`` over the sweep's mean fractions (None when the
    fraction lies outside what the sweep reached)."""
    pts = sorted(sweep, key=lambda r: r["fraction"])
    xs = np.array([r["fraction"] for r in pts])
    if fraction < xs.min() - 1e-9 or fraction > xs.max() + 1e-9:
        return None
    errs = np.array([r["errors"] for r in pts])  # (thresholds, generations)
    xs, order = np.unique(xs, return_index=True)  # equal fractions: the first (smallest threshold, least error)
    errs = errs[order]
    if xs.size == 1:
        return errs[0]
    return np.array([np.interp(fraction, xs, errs[:, g]) for g in range(errs.shape[1])])


def holds_against(run: dict, refit_errors, calibrated_fraction: float, steps: int) -> dict:
    """The measured rule: the run's excess error over the refit at equal compute, paired by generation."""
    if refit_errors is None:
        return {"excess": None, "tolerance": None, "holds": None}
    diff = np.asarray(run["errors"]) - np.asarray(refit_errors)
    excess = float(diff.mean())
    tol = float(2.0 * diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0
    within_budget = run["fraction"] <= calibrated_fraction + 1.0 / steps
    return {"excess": excess, "tolerance": tol, "ratio": float(np.mean(run["errors"]) / max(np.mean(refit_errors), 1e-12)),
            "holds": bool(excess <= tol or (within_budget and excess <= 0))}


def agrees(verdict: str, file_holds, retune_holds, refit_no_cache: bool) -> bool | None:
    if file_holds is None:
        return None
    if verdict == "holds":
        return bool(file_holds)
    if verdict == "retune":
        return bool(not file_holds and retune_holds)
    return bool(refit_no_cache or (not file_holds and not retune_holds))


def measure_case(case: Case, args, pipes: dict) -> dict:
    from calib.methods.registry import load_document
    from calib.trace.prompts import bundled_prompts_path, read_prompts
    import calib.runtime as cr

    start = time.perf_counter()
    doc = load_document(ROOT / case.coeffs)
    call = {**file_call(doc), **case.call}
    base_name = case.model.split(":", 1)[1].split("-lora")[0].split("-4step")[0].split("-8step")[0]
    prompts = read_prompts(bundled_prompts_path(base_name))
    check = run_check(case, args.generations)
    log(f"  {case.name}: calib check says {check['verdict']}")
    if case.model not in pipes:
        pipes[case.model] = load_builtin(case.model)
    pipe = pipes[case.model]
    served = Served(pipe, prompts, args.seeds, call)
    config = cr.load(ROOT / case.coeffs)
    threshold = float(config.recommended_threshold)
    calibrated = next(float(r["compute_fraction"]) for r in doc["thresholds"]["table"]
                      if math.isclose(float(r["threshold"]), threshold, rel_tol=1e-9))
    file_run = served.run(config, threshold)
    refit_config, refit_doc = refit(case, call, prompts, args.calib_seeds, Path(args.cache), pipe)
    sweep = [served.run(refit_config, t) for t in GRID]
    refit_errors = at_fraction(sweep, file_run["fraction"])
    file_rule = holds_against(file_run, refit_errors, calibrated, call["steps"])
    retune = None
    if check["verdict"] == "retune":
        retune_run = served.run(config, float(check["retune"]["threshold"]))
        retune = {**retune_run, **holds_against(retune_run, at_fraction(sweep, retune_run["fraction"]), calibrated,
                                                call["steps"])}
    refit_no_cache = (refit_doc.get("recommendation") or {}).get("cache") is False
    agreement = agrees(check["verdict"], file_rule["holds"], retune and retune["holds"], refit_no_cache)
    log(f"  {case.name}: file fraction {file_run['fraction']:.2f} error {file_run['error']:.4f}; refit at equal "
        f"compute {'-' if refit_errors is None else f'{np.mean(refit_errors):.4f}'}; agrees: {agreement} "
        f"({time.perf_counter() - start:.0f} s)")
    return {"case": case.name, "what": case.what, "coeffs": case.coeffs, "model": case.model, "call": call,
            "check": {k: check.get(k) for k in ("verdict", "exit_code", "why", "commands", "fraction", "error",
                                                "rescaler", "retune", "one_skip", "call_difference",
                                                "model_difference")},
            "calibrated_fraction": calibrated, "file": {**file_run, **file_rule},
            "refit": {"error_at_equal_compute": None if refit_errors is None else float(np.mean(refit_errors)),
                      "recommended_threshold": float(refit_doc["thresholds"]["recommended"]),
                      "no_cache": refit_no_cache, "sweep": [{k: r[k] for k in ("threshold", "fraction", "error")}
                                                            for r in sweep]},
            "retune": retune, "agrees": agreement, "seconds": time.perf_counter() - start}


def _f(v, fmt="{:.4f}"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        f, rf, rt = r["file"], r["refit"], r["retune"]
        measured = ("holds" if f["holds"] else ("retune holds" if rt and rt["holds"] else "does not hold"))
        if f["holds"] is None:
            measured = "refit recommends no cache" if rf["no_cache"] else "no refit at this compute"
        rows.append([
            r["case"], r["what"], r["model"].split(":", 1)[1],
            f"{_f(f['fraction'], '{:.2f}')} ({_f(r['calibrated_fraction'], '{:.2f}')})",
            _f(f["error"]), _f(rf["error_at_equal_compute"]),
            _f(f.get("ratio"), "{:.2f}x"), measured,
            r["check"]["verdict"] + (f" ({r['check']['retune']['threshold']:g})" if r["check"]["verdict"] == "retune"
                                     else ""),
            {True: "yes", False: "**no**", None: "-"}[r["agrees"]],
        ])
    return markdown_table(["case", "what changed", "model", "file's compute (calibrated)", "file's rel-L1",
                           "refit's rel-L1 at equal compute", "loss", "measured", "calib check", "agrees"], rows)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(c.name for c in CASES))
    ap.add_argument("--seeds", default="2000,2001", help="held-out seeds of the served runs (x the bundled prompts)")
    ap.add_argument("--calib-seeds", default="0,1,2,3", help="seeds of the refits' traces (x the bundled prompts)")
    ap.add_argument("--generations", type=int, default=4, help="calib check --generations")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.calib_seeds = [int(s) for s in args.calib_seeds.split(",")]
    names = args.cases.split(",")
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; cases: {', '.join(c.name for c in CASES)}")
    start = time.perf_counter()
    pipes, results = {}, []
    for case in [c for c in CASES if c.name in names]:
        log(f"case {case.name}: {case.coeffs} on {case.model} {case.call or ''}")
        results.append(measure_case(case, args, pipes))
        if args.json:
            write_json(args.json, {"results": results, "seeds": args.seeds, "calib_seeds": args.calib_seeds,
                                   "generations": args.generations})
    print("## Does the file still hold? (benchmarks/validity.py)\n")
    print(table(results))
    agreed = [r["agrees"] for r in results if r["agrees"] is not None]
    print(f"\ncalib check agrees with the measurement in {sum(agreed)} of {len(agreed)} cases "
          f"({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
