"""How many prompts does a calibration need? Held-out error of fits from 1, 2, 4, 8, 16, 32 prompts against a large fit.

    python benchmarks/sample_efficiency.py [--model builtin:digits] [--repeats 20] [--indicator modulated_input]
                                           [--json out.json]

A "prompt" here is one traced generation (prompt x seed): TeaCache calibrated on 70 prompts with one seed each. The
pool is the bundled prompts x 8 seeds (80 generations on builtin:digits); the test set is the same prompts with
4 other seeds, never used for fitting. For each size N, ``--repeats`` random subsets of N generations are fitted and
scored on the test set (MAE of the predicted output change, evaluated as the runtime does: clamped to the fitted
domain, floored at 0), relative to the same procedure fitted on the whole pool. Two procedures:

* paper: degree 4, least squares, no shape check (TeaCache's fit);
* calib: ``--degree auto``, least squares, shape-constrained where the plain fit violates (calib fit's default).

Both fit ``--indicator`` (default: the paper's modulated input; ``temb`` is what ``calib fit --indicator auto`` keeps
on builtin:wan-digits) with ``--normalization`` (default none).

Traces are cached (``$CALIB_BENCH_CACHE``, default ``$TMPDIR/calib-bench``); the first run traces ~120 generations
(about a minute on 2 cores for builtin:digits), a rerun only fits (~1-2 minutes).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import DEFAULT_CACHE, held_out_mae, log, markdown_table, subset, traced, write_json

SIZES = (1, 2, 4, 8, 16, 32)
PROCEDURES = {
    "paper": dict(degree=4, shape="none"),
    "calib": dict(degree="auto", shape="auto"),
}


def main(argv=None) -> dict:
    from calib.methods.teacache.fit import fit_traces
    from calib.trace.prompts import bundled_prompts_path, read_prompts
    from calib.methods.teacache.rescalers import shape_check

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:digits")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pool-seeds", type=int, default=8)
    ap.add_argument("--test-seeds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--indicator", default="modulated_input", choices=["modulated_input", "block_input", "temb"])
    ap.add_argument("--normalization", default="none", choices=["none", "delta_sigma"])
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    prompts = read_prompts(bundled_prompts_path(args.model.split(":", 1)[1]))
    log(f"{args.model}: pool {len(prompts)} prompts x {args.pool_seeds} seeds, test x {args.test_seeds} seeds")
    pool, pipe = traced(args.model, prompts, range(args.pool_seeds), args.steps, cache=args.cache)
    test, _ = traced(args.model, prompts, range(100, 100 + args.test_seeds), args.steps, cache=args.cache, pipe=pipe)
    generations = sorted({(t.prompt, t.seed) for t in pool.trajectories})
    sizes = [n for n in SIZES if n < len(generations)] + [len(generations)]

    procedures = {name: dict(kw, indicator=args.indicator, normalization=args.normalization)
                  for name, kw in PROCEDURES.items()}
    large = {name: fit_traces(pool, **kw) for name, kw in procedures.items()}
    large_mae = {name: held_out_mae(res, test) for name, res in large.items()}
    log("large fits: " + ", ".join(f"{k} degree {v.rescaler.degree_} MAE {large_mae[k]:.5f}" for k, v in large.items()))

    rng = np.random.default_rng(0)
    results = {name: {} for name in PROCEDURES}
    absolute = {name: {} for name in PROCEDURES}
    violations = {name: 0 for name in PROCEDURES}
    for n in sizes:
        repeats = 1 if n == len(generations) else args.repeats
        for name in PROCEDURES:
            results[name][n] = []
            absolute[name][n] = []
        for _ in range(repeats):
            pick = {generations[i] for i in rng.choice(len(generations), size=n, replace=False)}
            part = subset(pool, lambda t: (t.prompt, t.seed) in pick)
            for name, kw in procedures.items():
                res = fit_traces(part, **kw)
                mae = held_out_mae(res, test)
                results[name][n].append(mae / large_mae[name] - 1.0)
                absolute[name][n].append(mae)
                if not shape_check(res.rescaler.coef_, res.rescaler.domain_).ok:
                    violations[name] += 1
        log(f"  N={n}: " + ", ".join(
            f"{name} median {np.median(results[name][n]):+.1%}" for name in PROCEDURES))

    rows = []
    for n in sizes:
        row = [n]
        for name in PROCEDURES:
            v = np.asarray(results[name][n])
            row += [f"{np.median(absolute[name][n]):.5f}", f"{np.median(v):+.1%}", f"{np.percentile(v, 90):+.1%}",
                    f"{np.mean(v <= 0.05):.0%}"]
        rows.append(row)
    header = ["prompts"]
    for name in PROCEDURES:
        header += [f"{name}: median MAE", f"{name}: median excess", f"{name}: p90 excess", f"{name}: within 5 %"]
    print(f"## Sample efficiency on {args.model} ({args.steps} steps, indicator {args.indicator}"
          + ("" if args.normalization == "none" else f" / {args.normalization}") + ")\n")
    print(f"Held-out MAE of the large fit ({len(generations)} generations): "
          + ", ".join(f"{k} {large_mae[k]:.5f} (degree {large[k].rescaler.degree_})" for k in PROCEDURES) + ".")
    print(f"Excess = held-out MAE of an N-prompt fit / that of the large fit - 1, over {args.repeats} random subsets.\n")
    print(markdown_table(header, rows))
    print("\nfits that are negative or decreasing somewhere on their domain: "
          + ", ".join(f"{k} {v} of {sum(len(r) for r in results[k].values())}" for k, v in violations.items()))
    elapsed = time.perf_counter() - start
    print(f"\n({elapsed:.0f} s)")
    out = {
        "model": args.model,
        "steps": args.steps,
        "indicator": args.indicator,
        "normalization": args.normalization,
        "large_mae": large_mae,
        "large_degree": {k: v.rescaler.degree_ for k, v in large.items()},
        "excess": {name: {str(n): list(map(float, v)) for n, v in r.items()} for name, r in results.items()},
        "mae": {name: {str(n): list(map(float, v)) for n, v in r.items()} for name, r in absolute.items()},
        "shape_violations": violations,
        "seconds": elapsed,
    }
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
