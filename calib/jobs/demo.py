"""``calib demo``: the whole loop on the built-in digits model, with the numbers a user needs to trust it.

trace (bundled prompts x seeds) -> fit (coefficient JSON + PNG) -> search a schedule and compare it with the gate, both
with the schedule fit's forecast, at 50 % of full forwards on held-out prompts (``calib fit --method auto`` in small)
-> generate held-out prompts and seeds with and without the better one, interleaved, and report the measured speed-up,
the error against the uncached output, and whether a digit classifier still reads the cached digits.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import calib.runtime as cr
from calib._io import resolve_output, write_bytes
from calib.errors import CalibError
from calib.evaluate.harness import compare_cached
from calib.evaluate.metrics import psnr
from calib.jobs.fit import run_fit
from calib.methods.auto.method import compare
from calib.methods.base import TuneGoal
from calib.methods.registry import load_document, write_document
from calib.methods.schedule.measure import setup_from_traces
from calib.methods.schedule.method import choose_budget, fit_schedule
from calib.models import digits
from calib.models.digit_reader import (  # noqa: F401  (benchmarks/transfer.py imports them here)
    classify, digit_classifier)
from calib.models.digits import latents_to_images
from calib.store import read_traces
from calib.store.search_log import SearchLog
from calib.trace import TraceSettings, run_trace
from calib.trace.prompts import read_prompts

HELD_OUT_SEED = 1000
MODEL = "builtin:digits"

DEMO_FRACTION = 0.5  # the budget the demo compares the gate and the schedule at: 2x fewer forwards
DEMO_SEARCH_EVALS = 20  # a short local search (calib fit's default is 60): the demo shows the loop, quickly
DEMO_TARGETS = ("output",)  # what the full search chose on both built-in models (docs/evaluation.md)


def _choose(pipe, trace_path, coeffs_path, coeffs_dir, echo):
    """``calib fit --method auto`` in small: a schedule for half the compute searched on the traced prompts (one
    seed, the output forecast, a short local search), then gate + forecast against it at 50 % of compute on the
    held-out prompts. Returns the verdict and the schedule file's path."""
    trace_set = read_traces([trace_path])
    seeds = sorted({t.seed for t in trace_set.trajectories})[:1]
    schedule_path = coeffs_dir / "digits.schedule.json"
    doc = fit_schedule(pipe, trace_set, source=MODEL, log=SearchLog(schedule_path), fractions=(DEMO_FRACTION,),
                       targets=DEMO_TARGETS, max_local=DEMO_SEARCH_EVALS, seeds=seeds, echo=echo)
    entry, reached = choose_budget(doc, TuneGoal("compute_fraction", DEMO_FRACTION))
    doc["recommended"] = {"budget": entry["budget"]}
    write_document(doc, schedule_path)
    verdict = compare(pipe, setup_from_traces(trace_set, MODEL, seeds=seeds), load_document(coeffs_path), doc, entry,
                      reached, DEMO_FRACTION, trace_set, echo=echo)
    echo(verdict["why"])
    return verdict, schedule_path


def run_demo(*, prompts_file=None, steps=30, seeds=(0, 1), guidance=3.0, threshold=None, traces_dir=Path("traces"),
             coeffs_dir=Path("coeffs"), overwrite=False, echo=print) -> dict:
    """The stages: check every setting, trace and fit, choose what to run, run it cached against uncached, report."""
    # every setting is checked before the first file is written: a refused demo leaves nothing behind
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)
                                      and threshold >= 0):
        raise CalibError(f"--threshold must be a finite number >= 0, got {threshold}")
    settings = TraceSettings(steps=steps, guidance=guidance, seeds=tuple(seeds))
    if prompts_file is not None:
        read_prompts(prompts_file)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    coeffs_dir = Path(coeffs_dir)
    trace_path, coeffs_path = Path(traces_dir) / "digits.h5", coeffs_dir / "digits.json"
    for path in (trace_path, coeffs_path, coeffs_path.with_suffix(".png"), coeffs_dir / "digits.demo.png"):
        resolve_output(path)
    echo("== 1/4 trace: builtin:digits on the bundled prompts")
    pipe = digits.load_pipeline()
    run_trace(MODEL, prompts_file, settings, out=trace_path, overwrite=overwrite, echo=echo, pipe=pipe)
    echo("\n== 2/4 fit: polynomial rescaler with diagnostics")
    run_fit("teacache", [trace_path], out=coeffs_path, echo=echo)
    echo("\n== 3/4 what is best here: gate + forecast or a searched schedule + forecast, on held-out prompts")
    choice = _what_to_run(pipe, trace_path, coeffs_path, coeffs_dir, threshold, echo)
    echo("\n== 4/4 cached vs uncached generation on held-out seeds")
    outcome = _cached_against_uncached(pipe, choice, steps, guidance, coeffs_dir)
    _say_outcome(outcome, choice, trace_path, coeffs_path, echo)
    stats = outcome["stats"]
    return {
        "speedup": outcome["speedup"],
        "latent_rel_l1": outcome["latent_rel_l1"],
        "psnr": outcome["psnr"],
        "cached_correct": outcome["cached_correct"],
        "base_correct": outcome["base_correct"],
        "stats": stats,
        "threshold": choice["threshold"],
        "budget": choice["budget"],
    }


def _what_to_run(pipe, trace_path, coeffs_path, coeffs_dir, threshold, echo) -> dict:
    """The config, threshold or budget and forecast the demo runs: the better of gate and schedule (a given
    ``threshold``: the gate at it, no comparison)."""
    config = cr.load(coeffs_path)
    choice = {"config": config, "threshold": threshold if threshold is not None else config.recommended_threshold,
              "forecast": None, "budget": None, "schedule_path": None}
    if threshold is not None:
        echo(f"loaded {coeffs_path}: {config.model_class}, threshold {threshold:g} (given: no comparison)")
        return choice
    verdict, schedule_path = _choose(pipe, trace_path, coeffs_path, coeffs_dir, echo)
    forecast = cr.ForecastSpec.from_json(verdict[verdict["kept"]]["forecast"])
    choice.update(forecast=forecast, schedule_path=schedule_path)
    if verdict["kept"] == "schedule":
        choice.update(config=cr.load(schedule_path), budget=verdict["schedule"]["budget"])
        echo(f"using {schedule_path}: budget {choice['budget']:g}, forecast {forecast.as_json()}")
    else:
        choice["threshold"] = verdict["gate"]["threshold"]
        echo(f"using {coeffs_path}: threshold {choice['threshold']:g} with forecast {forecast.as_json()}")
    return choice


def _cached_against_uncached(pipe, choice: dict, steps, guidance, coeffs_dir: Path) -> dict:
    """The held-out digits generated with and without the chosen cache: timings, error, legibility, and the
    comparison image (top: uncached, bottom: cached)."""
    from io import BytesIO

    from PIL import Image

    prompts = [f"a handwritten {d}" for d in range(10)]
    result = compare_cached(pipe, choice["config"], choice["threshold"], prompts, steps=steps, guidance=guidance,
                            seed=HELD_OUT_SEED, forecast=choice["forecast"], budget=choice["budget"])
    base_imgs = latents_to_images(result["base_latents"])
    cached_imgs = latents_to_images(result["cached_latents"])
    classifier = digit_classifier()
    truth = np.arange(10)
    what = (f"cached: budget {choice['budget']:g} of {steps} steps" if choice["budget"] is not None
            else f"cached: gate at threshold {choice['threshold']:g}")
    picture = comparison_picture(digits.image_grid(base_imgs), digits.image_grid(cached_imgs), what)
    buffer = BytesIO()
    picture.save(buffer, format="PNG")
    return {**result,
            "base_correct": int((classify(classifier, base_imgs) == truth).sum()),
            "cached_correct": int((classify(classifier, cached_imgs) == truth).sum()),
            "psnr": psnr(np.stack(base_imgs), np.stack(cached_imgs)),
            "comparison": write_bytes(coeffs_dir / "digits.demo.png", buffer.getvalue())}


DIFFERENCE_GAIN = 8  # the per-pixel difference is small: scaled so that a reader sees where it is


def comparison_picture(base_grid, cached_grid, cached_label: str):
    """Three labelled rows: the uncached digits, the cached ones, and their absolute difference (x
    ``DIFFERENCE_GAIN``, black where they agree)."""
    from PIL import Image, ImageDraw

    difference = np.abs(base_grid.astype(np.int16) - cached_grid.astype(np.int16)) * DIFFERENCE_GAIN
    rows = [("uncached", base_grid), (cached_label, cached_grid),
            (f"|uncached - cached| x{DIFFERENCE_GAIN}", np.clip(difference, 0, 255).astype(np.uint8))]
    strip = 14  # a label's height in pixels (PIL's built-in bitmap font)
    width = base_grid.shape[1]
    picture = Image.new("L", (width, sum(strip + grid.shape[0] for _, grid in rows)), color=255)
    draw = ImageDraw.Draw(picture)
    top = 0
    for label, grid in rows:
        draw.text((4, top + 1), label, fill=0)
        picture.paste(Image.fromarray(grid), (0, top + strip))
        top += strip + grid.shape[0]
    return picture


def _say_outcome(outcome: dict, choice: dict, trace_path, coeffs_path, echo) -> None:
    stats = outcome["stats"]
    echo(f"  steps computed      {stats['computed']} of {stats['steps']} ({stats['skipped']} skipped, "
         f"{stats['skipped'] / stats['steps']:.0%})")
    echo(f"  measured speed-up   {outcome['speedup']:.2f}x  (median of 3 interleaved runs, "
         f"{outcome['plain_seconds'] * 1000:.0f} ms -> {outcome['cached_seconds'] * 1000:.0f} ms)")
    echo(f"  error vs uncached   latent rel-L1 {outcome['latent_rel_l1']:.4f}, image PSNR {outcome['psnr']:.1f} dB")
    echo(f"  legibility          classifier reads {outcome['cached_correct']}/10 cached digits correctly (uncached: "
         f"{outcome['base_correct']}/10)")
    echo(f"\nfiles: trace {trace_path}, coefficients {coeffs_path} (+ {coeffs_path.with_suffix('.png')}), "
         f"comparison {outcome['comparison']} (labelled rows: uncached, cached, their difference)")
    forecast = choice["forecast"]
    if choice["budget"] is not None:
        how = f"    handle = cr.apply(pipe, cr.load({str(choice['schedule_path'])!r}), budget={choice['budget']:g})\n"
    elif forecast is not None:
        how = (f"    handle = cr.apply(pipe, cr.load({str(coeffs_path)!r}), threshold={choice['threshold']:g},\n"
               f"                      forecast=cr.ForecastSpec.from_json({forecast.as_json()!r}))\n")
    else:
        how = f"    handle = cr.apply(pipe, cr.load({str(coeffs_path)!r}))   # threshold defaults to the recommended one\n"
    echo("\nuse it in your code:\n"
         "    import calib.runtime as cr\n"
         + how +
         "    images = pipe(prompt).images\n"
         "    print(handle.stats()); handle.remove()\n"
         f"or paste into a TeaCache-style script:  calib export {coeffs_path} --format poly1d")
