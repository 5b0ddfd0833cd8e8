"""Step-count transfer: calibrate at one step count, run at others, with the plain and the Δσ-normalised indicator.

    python benchmarks/transfer.py [--model builtin:digits] [--calib-steps 30] [--run-steps 15,30,50]
                                  [--indicator modulated_input] [--json out.json]

1. Held-out error. Rescalers fitted on a trace at ``--calib-steps`` (bundled prompts x 4 seeds) predict the output
   change of held-out generations (2 other seeds) traced at each of ``--run-steps``; MAE of the predicted output
   change, evaluated as the runtime does. Candidates: modulated input and temb, each plain (``none``) and normalised
   (``delta_sigma``), with calib fit's defaults (degree auto, shape-constrained). "oracle" is the plain fit
   calibrated at the run's own step count (same prompts and seeds), the best one can hope for.
   ``--indicator`` (default: the paper's modulated input) is the indicator of the oracle row and of the real runs.
2. Real runs. The 30-step coefficient files (plain, normalised) drive the runtime on held-out prompts and seed
   (the ten digits, seed 1000) at each run step count, with the threshold each file recommends (the threshold a user
   would take from the file) and on a grid of thresholds, compared at matched compute (interpolated error at the
   compute fraction the plain file reaches at 30 steps). Quality: latent rel-L1 against the uncached run of the same
   step count, and how many of the ten digits a classifier still reads as the prompted digit.

Traces are cached like in sample_efficiency.py; a cold run takes a few minutes on 2 cores for builtin:digits.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import DEFAULT_CACHE, held_out_mae, load_builtin, log, markdown_table, traced, write_json

CANDIDATES = [("modulated_input", "none"), ("modulated_input", "delta_sigma"), ("temb", "none"), ("temb", "delta_sigma")]
GRID = (0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4)
HELD_OUT_SEED = 1000


def _config(res_map, trace_set, pipe_source):
    """A runtime TeaCacheConfig (via the real coefficient document) for {component: FitResult}."""
    import calib.runtime as cr
    from calib.methods.teacache.components import build_document
    from calib.methods.teacache.fit import runtime_rescaler
    from calib.methods.teacache.tune import RECOMMENDED_COMPUTE_FRACTION, recommend, threshold_table, thresholds_section

    first = next(iter(res_map.values()))
    rescalers = {name: runtime_rescaler(res) for name, res in res_map.items()}
    table = threshold_table(trace_set, rescalers, indicator=first.indicator, normalization=first.normalization)
    chosen = recommend(table)
    doc = build_document(res_map, trace_set, thresholds=thresholds_section(table, chosen, RECOMMENDED_COMPUTE_FRACTION))
    return cr.parse(doc)


def _generate(pipe, steps, guidance, prompts):
    import torch

    g = torch.Generator().manual_seed(HELD_OUT_SEED)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="latent")
    return torch.stack(out.images)


def _cached_run(pipe, config, threshold, steps, guidance, prompts, base, classify):
    import calib.runtime as cr

    with cr.apply(pipe, config, threshold=threshold) as handle:
        latents = _generate(pipe, steps, guidance, prompts)
        stats = handle.stats()
    err = float((latents - base).abs().mean() / base.abs().mean())
    return {"threshold": float(threshold), "compute_fraction": stats["compute_fraction"], "latent_rel_l1": err,
            "correct": classify(latents) if classify else None}


def _at_fraction(runs, fraction):
    """Latent error interpolated at a compute fraction (runs sorted by compute fraction)."""
    pts = sorted((r["compute_fraction"], r["latent_rel_l1"]) for r in runs)
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if fraction < xs.min() or fraction > xs.max():
        return float("nan")
    return float(np.interp(fraction, xs, ys))


def main(argv=None) -> dict:
    from calib.methods.teacache.fit import fit_all_components
    from calib.trace.prompts import bundled_prompts_path, read_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:digits")
    ap.add_argument("--calib-steps", type=int, default=30)
    ap.add_argument("--run-steps", default="15,30,50")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--indicator", default="modulated_input", choices=sorted({c[0] for c in CANDIDATES}),
                    help="indicator of the oracle row and of the real runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    run_steps = [int(s) for s in args.run_steps.split(",")]
    start = time.perf_counter()

    name = args.model.split(":", 1)[1]
    prompts = read_prompts(bundled_prompts_path(name))
    pipe = load_builtin(args.model)
    calib_set, _ = traced(args.model, prompts, range(4), args.calib_steps, guidance=args.guidance, cache=args.cache,
                          pipe=pipe)
    eval_sets, own_sets = {}, {}
    for steps in run_steps:
        eval_sets[steps], _ = traced(args.model, prompts, (100, 101), steps, guidance=args.guidance, cache=args.cache,
                                     pipe=pipe)
        own_sets[steps], _ = traced(args.model, prompts, range(4), steps, guidance=args.guidance, cache=args.cache,
                                    pipe=pipe)

    # -- 1. held-out error -----------------------------------------------------------------------------------------
    fits = {}
    for ind, norm in CANDIDATES:
        fits[(ind, norm)] = fit_all_components(calib_set, degree="auto", indicator=ind, normalization=norm)
    oracle = {s: fit_all_components(own_sets[s], degree="auto", indicator=args.indicator) for s in run_steps}
    err_rows, errors = [], {}
    for ind, norm in CANDIDATES:
        row = [ind, norm, fits[(ind, norm)]["transformer"].rescaler.degree_]
        for s in run_steps:
            e = held_out_mae(fits[(ind, norm)]["transformer"], eval_sets[s])
            errors[f"{ind}/{norm}/{s}"] = e
            row.append(f"{e:.4f}")
        err_rows.append(row)
    row = [f"{args.indicator} (oracle: fitted at the run's steps)", "none", "-"]
    for s in run_steps:
        e = held_out_mae(oracle[s]["transformer"], eval_sets[s])
        errors[f"oracle/{s}"] = e
        row.append(f"{e:.4f}")
    err_rows.append(row)
    log("held-out errors done")

    # -- 2. real runs ----------------------------------------------------------------------------------------------
    classify = None
    if name == "digits":
        from calib.models.digit_reader import classify as classify_images, digit_classifier
        from calib.models.digits import latents_to_images

        clf = digit_classifier()
        truth = np.arange(10)

        def classify(latents):
            return int((classify_images(clf, latents_to_images(latents)) == truth).sum())

        run_prompts = [f"a handwritten {d}" for d in range(10)]
    else:
        run_prompts = prompts
    configs = {norm: _config(fits[(args.indicator, norm)], calib_set, args.model) for norm in ("none", "delta_sigma")}
    runs, real_rows = {}, []
    for s in run_steps:
        base = _generate(pipe, s, args.guidance, run_prompts)
        base_correct = classify(base) if classify else None
        for norm, config in configs.items():
            rec = _cached_run(pipe, config, config.recommended_threshold, s, args.guidance, run_prompts, base, classify)
            sweep = [_cached_run(pipe, config, t, s, args.guidance, run_prompts, base, classify) for t in GRID]
            runs[f"{norm}/{s}"] = {"recommended": rec, "sweep": sweep, "uncached_correct": base_correct}
        log(f"  real runs at {s} steps done")
    target = runs[f"none/{args.calib_steps}"]["recommended"]["compute_fraction"] if args.calib_steps in run_steps else 0.6
    for s in run_steps:
        for norm in ("none", "delta_sigma"):
            r = runs[f"{norm}/{s}"]
            rec = r["recommended"]
            real_rows.append([
                s, norm, f"{rec['threshold']:g}", f"{rec['compute_fraction']:.2f}", f"{rec['latent_rel_l1']:.4f}",
                "-" if rec["correct"] is None else f"{rec['correct']}/10 ({r['uncached_correct']}/10)",
                f"{_at_fraction(r['sweep'], target):.4f}",
            ])

    print(f"## Step-count transfer on {args.model}: calibrated at {args.calib_steps} steps\n")
    print("Held-out MAE of the predicted output change (generations not used for fitting):\n")
    print(markdown_table(["indicator", "normalization", "degree"] + [f"run at {s}" for s in run_steps], err_rows))
    print(f"\nReal runs with the {args.calib_steps}-step {args.indicator} files on held-out prompts/seed "
          f"(latent rel-L1 vs the uncached run of the same step count):\n")
    print(markdown_table(
        ["run steps", "normalization", "file's threshold", "compute fraction", "latent rel-L1",
         "digits read (uncached)", f"rel-L1 at compute {target:.2f}"], real_rows))
    elapsed = time.perf_counter() - start
    print(f"\n({elapsed:.0f} s)")
    out = {"model": args.model, "calib_steps": args.calib_steps, "indicator": args.indicator, "errors": errors,
           "runs": runs, "matched_compute": target, "seconds": elapsed}
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
