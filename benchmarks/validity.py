"""Does a calibration still hold? The transfer table: a shipped file applied to another model or call, its measured
loss against a refit at equal compute, and what ``calib check`` said.

    python benchmarks/validity.py [--cases base,lora,...] [--seeds 2000,2001] [--json out.json]

For each case (a shipped coefficient file, the model and call it is served on):

1. ``calib check FILE --model M [call] --json`` is run as a user runs it (its own process), and its verdict kept.
2. The file is served as it is (the runtime at its recommended threshold) on held-out prompts x seeds of the case's
   call: its measured fraction of full forwards and final-latent rel-L1 against the uncached run of the same prompt
   and seed.
3. A refit: the case's call traced on calibration seeds (the bundled prompts x ``--calib-seeds``) and ``calib fit``
   run on it with its defaults, in its own process, as a user refits.
4. The file and the refit each served over a threshold grid on the same held-out generations; errors are compared
   at equal compute, interpolated per generation at a fraction of full forwards, and on the same prompts and seeds (the
   tolerance: twice the standard error of the difference of means). The measured verdict, in check's words:
   *holds* -- the file as it is computes at most its calibrated fraction plus one step and is within the refit's
   error at the compute it reached; *retune* -- it does not, but the file's own rescaler at the calibrated fraction
   (another threshold) is within the refit's error there; *refit* -- neither, or the refit itself recommends no cache
   (few steps); *holds* and *retune* also keep the quality bar (calib fit's ``--max-error``, 0.05). calib check
   agrees when it says the same.

Traces for the refits are cached like the other fitting benchmarks (CALIB_BENCH_CACHE); a cold run of every case
takes about 25 minutes on 2 shared CPU cores.
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
    Case("fewstep-4", "the 4-step student (guidance distilled) at 4 steps", "coeffs/digits.json",
         "builtin:digits-4step", {"steps": 4, "guidance": 1.0}),
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


def excess_over(errors, refit_errors) -> dict:
    """The excess error over the refit at equal compute (the same prompts and seeds) and its tolerance: twice the
    standard error of the difference of the two means (unpaired, as calib check judges it: where the gate decides
    the same steps in every generation, pairing leaves only the choice of steps)."""
    a, b = np.asarray(errors, dtype=float), np.asarray(refit_errors, dtype=float)
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size) if a.size > 1 else 0.0
    excess = float(a.mean() - b.mean())
    return {"excess": excess, "tolerance": 2.0 * se, "ratio": float(a.mean() / max(float(b.mean()), 1e-12)),
            "within": bool(excess <= 2.0 * se)}


def measured_verdict(file_run, file_sweep, refit_sweep, calibrated: float, steps: int, refit_no_cache: bool,
                     max_error: float) -> dict:
    """What the measurements say, in calib check's words:

    * holds: the file, served as it is, computes at most its calibrated fraction (plus one step) and its error is
      within the refit's at the same compute;
    * retune: it does not, but the file's own rescaler at another threshold, at the calibrated fraction, is within
      the refit's error there;
    * refit: neither; or the refit itself recommends no cache (few steps), which no threshold of the file gives.

    holds and retune also keep the quality bar (``max_error``, calib fit's and calib check's).
    """
    budget = calibrated + 1.0 / steps
    at_file = at_fraction(refit_sweep, file_run["fraction"])
    served = None if at_file is None else excess_over(file_run["errors"], at_file)
    mine, theirs = at_fraction(file_sweep, calibrated), at_fraction(refit_sweep, calibrated)
    retuned = None if mine is None or theirs is None else excess_over(mine, theirs)
    if refit_no_cache:
        verdict = "refit"
    elif (file_run["fraction"] <= budget and served is not None and served["within"]
          and file_run["error"] <= max_error):
        verdict = "holds"
    elif retuned is not None and retuned["within"] and float(np.mean(mine)) <= max_error:
        verdict = "retune"
    else:
        verdict = "refit"
    return {"verdict": verdict, "served": served, "retuned": retuned, "budget": budget,
            "refit_error_at_file_compute": None if at_file is None else float(np.mean(at_file)),
            "file_error_at_calibrated": None if mine is None else float(np.mean(mine)),
            "refit_error_at_calibrated": None if theirs is None else float(np.mean(theirs))}


def measure_case(case: Case, args, pipes: dict) -> dict:
    from calib.methods.quality import DEFAULT_MAX_ERROR
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
    file_sweep = [served.run(config, t) for t in GRID]
    refit_config, refit_doc = refit(case, call, prompts, args.calib_seeds, Path(args.cache), pipe)
    refit_sweep = [served.run(refit_config, t) for t in GRID]
    refit_no_cache = (refit_doc.get("recommendation") or {}).get("cache") is False
    measured = measured_verdict(file_run, file_sweep, refit_sweep, calibrated, call["steps"], refit_no_cache,
                                DEFAULT_MAX_ERROR)
    agreement = check["verdict"] == measured["verdict"]
    log(f"  {case.name}: file fraction {file_run['fraction']:.2f} error {file_run['error']:.4f}; measured "
        f"{measured['verdict']}; agrees: {agreement} ({time.perf_counter() - start:.0f} s)")
    return {"case": case.name, "what": case.what, "coeffs": case.coeffs, "model": case.model, "call": call,
            "check": {k: check.get(k) for k in ("verdict", "exit_code", "why", "commands", "fraction", "error",
                                                "rescaler", "retune", "one_skip", "call_difference",
                                                "model_difference")},
            "calibrated_fraction": calibrated, "measured": measured,
            "file": {k: file_run[k] for k in ("threshold", "fraction", "error", "fractions", "errors")},
            "file_sweep": brief(file_sweep),
            "refit": {"recommended_threshold": float(refit_doc["thresholds"]["recommended"]),
                      "no_cache": refit_no_cache, "sweep": brief(refit_sweep)},
            "agrees": agreement, "seconds": time.perf_counter() - start}


def _f(v, fmt="{:.4f}"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def brief(sweep: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("threshold", "fraction", "error")} for r in sweep]


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        f, m = r["file"], r["measured"]
        check = r["check"]
        said = check["verdict"]
        if said == "retune":
            said += f" ({check['retune']['threshold']:g})"
        if said.startswith("refit") and (check.get("one_skip") or {}).get("no_cache_recommended"):
            said += ", no cache"
        rows.append([
            r["case"], r["what"], f"{f['fraction']:.2f} ({r['calibrated_fraction']:.2f})", f"{f['error']:.4f}",
            _f(m["refit_error_at_file_compute"]),
            _f((m["served"] or {}).get("ratio") if m["refit_error_at_file_compute"] else None, "{:.2f}x"),
            _f(m["file_error_at_calibrated"]), _f(m["refit_error_at_calibrated"]),
            m["verdict"] + (", refit: no cache" if r["refit"]["no_cache"] else ""), said,
            "yes" if r["agrees"] else "**no**",
        ])
    return markdown_table(["case", "what changed", "file's compute (calibrated)", "file's rel-L1",
                           "refit's rel-L1 at the file's compute", "loss", "file retuned to calibrated compute",
                           "refit at calibrated compute", "measured", "calib check", "agrees"], rows)


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
    agreed = [r["agrees"] for r in results]
    print(f"\ncalib check agrees with the measurement in {sum(agreed)} of {len(agreed)} cases "
          f"({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
