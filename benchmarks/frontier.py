"""Quality vs compute of calib's calibrated TeaCache against other caches, on the built-in models.

    python benchmarks/frontier.py                    # builtin:digits (+ builtin:wan-digits when it is built in)
    python benchmarks/frontier.py --model builtin:digits --seeds 100,101 --steps 30

For each model: trace the bundled prompts (calibration seeds), fit the rescaler, then generate the same prompts on
held-out seeds with every method and compare each with the uncached generation (calib.frontier). Prints the table of
error at 50 % and 33 % of full forwards per method, writes ``OUT/<model>.json`` and ``OUT/<model>.png`` (error vs
fraction of full forwards). From a fresh clone it ran in 8-9 minutes on 2 shared CPU cores (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
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
    from calib.calibrate import run_fit
    from calib.export import write_atomic_bytes
    from calib.frontier import METHODS, run_frontier
    from calib.models.loading import load_model
    from calib.prompts import bundled_prompts_path, read_prompts
    from calib.store import read_traces
    from calib.trace import TraceSettings, run_trace

    name = model.split(":", 1)[1] if model.startswith("builtin:") else Path(model).name
    out = Path(args.out)
    try:
        pipe = load_model(model, device="cpu")
    except Exception as exc:  # noqa: BLE001 - e.g. a built-in model whose weights are not trained yet
        print(f"== {model}: skipped ({str(exc).splitlines()[0]})")
        return None
    print(f"== {model}: trace {args.steps} steps x seeds {list(args.calib_seeds)} on the bundled prompts")
    trace_path = out / "traces" / f"{name}.h5"
    run_trace(model, None, TraceSettings(steps=args.steps, guidance=args.guidance, seeds=args.calib_seeds),
              out=trace_path, echo=print, pipe=pipe)
    coeffs = out / f"{name}.coeffs.json"
    run_fit([trace_path], out=coeffs, plot=False, echo=lambda *a, **k: None)
    config = cr.load(coeffs)
    prompts = read_prompts(args.prompts or bundled_prompts_path(name))
    result = run_frontier(pipe, config, read_traces([trace_path]), prompts, args.seeds, steps=args.steps,
                          guidance=args.guidance, methods=args.methods or METHODS, plot=out / f"{name}.png",
                          echo=print)
    result["model"] = model
    result["coeffs"] = str(coeffs)
    write_atomic_bytes(out / f"{name}.json", (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    print(f"wrote {out / f'{name}.json'}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="Model(s) to run [default: the built-in models].")
    parser.add_argument("--prompts", help="Prompts file [default: the model's bundled prompts].")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--calib-seeds", type=_seeds, default=(0, 1), help="Seeds traced for the fit.")
    parser.add_argument("--seeds", type=_seeds, default=(100, 101), help="Held-out seeds the methods are compared on.")
    parser.add_argument("--methods", type=lambda s: s.split(","), help="Comma-separated subset of the methods.")
    parser.add_argument("--out", default="benchmarks/results", help="Output folder.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for model in args.model or default_models():
        run_model(model, args)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
