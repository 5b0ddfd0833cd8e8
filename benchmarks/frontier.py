"""Quality vs compute of calib's calibrated TeaCache against other caches, on the built-in models.

    python benchmarks/frontier.py                    # builtin:digits (+ builtin:wan-digits when it is built in)
    python benchmarks/frontier.py --model builtin:digits --seeds 100,101 --steps 30
    python benchmarks/frontier.py --model builtin:digits-4step --steps 4 --guidance 1   # a few-step model

For each model: split the bundled prompts into calibration prompts (every other line, from the first) and held-out
prompts (the rest), trace the calibration prompts (calibration seeds), fit the rescaler and the searched schedule
(``calib fit --method schedule``, on the calibration prompts only), then generate the held-out prompts on held-out
seeds with every method and compare each with the uncached generation (calib.evaluate.frontier). Prints the tables of error
at 50 %, 33 % and 25 % of full forwards and of compute per method, writes ``OUT/<model>.json`` and
``OUT/<model>.png`` (error vs fraction of full forwards). Timing: docs/evaluation.md.

On a few-step model the auto fits hold their choice to the quality bar (``--max-error``, calib.methods.quality): where
no skip keeps it, calib auto's row is the file as it is, every step computed ("no cache", error 0), beside the peers
at their targets; where only a smaller skip keeps it, the budget the file recommends is stated under the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def _seeds(text: str) -> tuple[int, ...]:
    if "-" in text and "," not in text:
        lo, hi = text.split("-")
        return tuple(range(int(lo), int(hi) + 1))
    return tuple(int(s) for s in text.split(",") if s.strip())


def default_models() -> list[str]:
    from calib.models.loading import BUILTIN

    return [f"builtin:{name}" for name in ("digits", "wan-digits") if name in BUILTIN]


def run_model(model: str, args) -> dict | None:
    import calib.runtime as cr
    from calib._io import write_bytes as write_atomic_bytes
    from calib.evaluate.frontier import ROWS, run_frontier
    from calib.evaluate.harness import COMPUTE_TARGETS as TARGETS
    from calib.jobs.fit import run_fit
    from calib.models.loading import load_model
    from calib.trace.prompts import bundled_prompts_path, read_prompts
    from calib.store import read_traces
    from calib.trace import TraceSettings, run_trace

    name = model.split(":", 1)[1] if model.startswith("builtin:") else Path(model).name
    out = Path(args.out)
    try:
        pipe = load_model(model, device="cpu")
    except Exception as exc:  # noqa: BLE001 - e.g. a built-in model whose weights are not trained yet
        print(f"== {model}: skipped ({str(exc).splitlines()[0]})")
        return None
    prompts = read_prompts(args.prompts or bundled_prompts_path(name))  # a variant (digits-4step): its base's
    calibration, held_out = prompts[0::2], prompts[1::2]
    if not held_out:
        raise SystemExit(f"{model}: need at least 2 prompts to hold some out")
    print(f"== {model}: trace {args.steps} steps x seeds {list(args.calib_seeds)} on {len(calibration)} calibration "
          f"prompts; {len(held_out)} held-out prompts x seeds {list(args.seeds)} for the comparison")
    trace_path = out / "traces" / f"{name}.h5"
    prompts_file = out / "traces" / f"{name}.calibration-prompts.txt"
    prompts_file.parent.mkdir(parents=True, exist_ok=True)
    prompts_file.write_text("\n".join(calibration) + "\n", encoding="utf-8")
    run_trace(model, prompts_file, TraceSettings(steps=args.steps, guidance=args.guidance, seeds=args.calib_seeds),
              out=trace_path, echo=print, pipe=pipe, overwrite=True)
    coeffs = out / f"{name}.coeffs.json"
    run_fit("teacache", [trace_path], out=coeffs, plot=False, echo=lambda *a, **k: None)
    config = cr.load(coeffs)
    trace_set = read_traces([trace_path])
    rows = args.methods or ROWS
    schedule_config, auto_config, fit_seconds = None, None, None
    if {"calib-auto", "calib-schedule", "calib-forecast"} & set(rows):
        # calib fit --method auto on the calibration prompts only (the job, as the CLI runs it), asked for each
        # target: the gate, the schedules searched at the three targets, the verdict at that target. The search is
        # the same for every target (the same budgets), so the later fits read the first one's measurements; a
        # rerun with the same settings reuses OUT/<model>.auto-50.search.json (delete it to measure anew; other
        # settings are refused in one line).
        began = time.perf_counter()
        auto_config = {}
        first_log = None
        for fraction in TARGETS:
            auto_path = out / f"{name}.auto-{round(fraction * 100)}.json"
            log = auto_path.with_name(auto_path.name[: -len(".json")] + ".search.json")
            if first_log is not None:
                shutil.copyfile(first_log, log)
            run_fit("auto", [trace_path], out=auto_path, compute_fraction=fraction, model=model,
                    seeds=args.search_seeds or None, search_evals=args.search_evals, max_error=args.max_error,
                    echo=print)
            first_log = first_log or log
            auto_config[fraction] = cr.load(auto_path)
            print(f"calib fit --method auto --compute-fraction {fraction:.3g}: kept {auto_config[fraction].method}")
            if schedule_config is None:
                schedule_config = cr.load(auto_path.with_name(auto_path.name[: -len(".json")] + ".schedule.json"))
        fit_seconds = round(time.perf_counter() - began, 1)
        print(f"calib fit --method auto at {len(TARGETS)} targets: {fit_seconds:.0f} s")
    result = run_frontier(pipe, config, trace_set, held_out, args.seeds, steps=args.steps,
                          guidance=args.guidance, rows=rows, plot=out / f"{name}.png",
                          echo=print, schedule_config=schedule_config, auto_config=auto_config)
    result["model"] = model
    result["coeffs"] = str(coeffs)
    result["calibration_prompts"] = calibration
    result["auto_fit_seconds"] = fit_seconds
    write_atomic_bytes(out / f"{name}.json", (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    print(f"wrote {out / f'{name}.json'}")
    return result


def main(argv=None) -> int:
    from calib.methods.quality import DEFAULT_MAX_ERROR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="Model(s) to run [default: the built-in models].")
    parser.add_argument("--prompts", help="Prompts file [default: the model's bundled prompts].")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--calib-seeds", type=_seeds, default=(0, 1), help="Seeds traced for the fit.")
    parser.add_argument("--seeds", type=_seeds, default=(100, 101), help="Held-out seeds the methods are compared on.")
    parser.add_argument("--methods", type=lambda s: s.split(","), help="Comma-separated subset of the methods.")
    parser.add_argument("--out", default="benchmarks/results", help="Output folder.")
    parser.add_argument("--search-seeds", type=_seeds, default=None,
                        help="calib fit --method auto: the seeds its search generates [default: the traced ones].")
    parser.add_argument("--search-evals", type=int, default=60,
                        help="calib fit --method auto: measured generations per local search of a budget.")
    parser.add_argument("--max-error", type=float, default=DEFAULT_MAX_ERROR,
                        help="calib fit --method auto: the quality bar (final-latent rel-L1) its choice is held to.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: these tiny models only spin with more on a busy machine).")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    for model in args.model or default_models():
        run_model(model, args)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
