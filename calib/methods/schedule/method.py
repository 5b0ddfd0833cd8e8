"""``calib fit --method schedule``: which steps to compute, chosen by measuring what forecasting the others costs.

The gate of TeaCache decides on line from a proxy (the indicator change); this method decides offline, from the
error of the *final* output, measured with the runtime in the loop (the idea of LeMiCa, arXiv 2511.00090, and
DPCache: a graph of measured segment errors searched by dynamic programming).

* **Segments** (:mod:`.measure`): a segment ``(i, j)`` computes steps ``i`` and ``j`` and forecasts the block
  stack's residual on ``i+1 .. j-1``; its cost is the latent rel-L1 of the final output against the uncached one,
  measured by a real generation per segment, for gaps ``j - i`` of 2 to ``G``: about ``steps x (G - 1)`` generations
  per seed and forecast; the prompts of one seed run as one batch.
* **Search** (:mod:`.paths`): for each budget, the min-sum and the lexicographic-minimax path over the segment costs.
* **Choice**: the costs add up only approximately (a forecast's history depends on the steps before it), so both
  searches' schedules, for each forecast, run on held-out prompts of the trace; the better one is kept per budget,
  and the forecast with the lower error over all budgets is the file's forecast.

The segment errors live in the store the job opens beside the output (``OUT.segments.json``;
:mod:`calib.store.segments`), so an interrupted run resumes, and ``--shard I/N`` measures only shard ``I`` of the
segment list; a run without ``--shard`` then reads every shard's file, measures what is missing and writes the
schedule file.
"""

from __future__ import annotations

import math

import calib.runtime as cr
from calib.errors import CalibError
from calib.methods.base import FitContext, Fitted, TuneContext, TuneGoal, Tuned
from calib.methods.cost_model import predicted_wall_speedup, wall_target_fraction
from calib.methods.schedule.measure import (Setup, choose, forecast_key, measure_segments, setup_from_traces,
                                            split_by_component)
from calib.methods.schedule.options import DEFAULT_GAP, DEFAULT_ORDERS, DEFAULT_VARIABLE, ScheduleOptions
from calib.methods.schedule.paths import segments
from calib.runtime import Forecast
from calib.store.segments import SegmentStore, segment_key

DEFAULT_FORECASTS = tuple(Forecast(order, DEFAULT_VARIABLE) for order in DEFAULT_ORDERS)
RECOMMENDED_COMPUTE_FRACTION = 0.5
ERROR_METRIC = ("mean over the held-out prompts x seeds of the relative L1 change of the final latents against the "
                "uncached generation of the same prompt and seed")


def fit_schedule(pipe, trace_set, *, source: str, store: SegmentStore, gap: int = DEFAULT_GAP,
                 forecasts=DEFAULT_FORECASTS, overwrite: bool = False, seeds=None, prompts=None, batch: int = 16,
                 echo=print, progress: bool = True, budgets=None) -> dict | None:
    """Measure, search, compare, and return the schedule document (None for a run of one shard of the store,
    which only measures). ``source``: the model ``pipe`` was loaded from; ``budgets``: only these (default: every
    budget the gaps allow)."""
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 2:
        raise CalibError(f"--gap must be an integer >= 2, got {gap!r}")
    forecasts = list(forecasts)
    setup = setup_from_traces(trace_set, source, prompts=prompts, seeds=seeds)
    if setup.steps < 3:
        raise CalibError(f"a schedule needs at least 3 steps (the first and the last always compute); the traces "
                         f"have {setup.steps}")
    errors = measure_segments(pipe, setup, gap=gap, forecasts=forecasts, store=store, overwrite=overwrite,
                              batch=batch, echo=echo, progress=progress)
    if store.shard is not None:
        echo(f"shard {store.shard[0]}/{store.shard[1]} measured; once every shard is done, run the same command "
             "without --shard to search and write the schedule file")
        return None
    missing = [(forecast_key(c), s) for c in forecasts for s in segments(setup.steps, gap, setup.component_of)
               if segment_key(*s) not in errors.get(forecast_key(c), {})]
    if missing:  # pragma: no cover - measure_segments measures everything without a shard
        raise CalibError(f"{len(missing)} segments are not measured yet")
    chosen = choose(pipe, setup, errors, forecasts, batch=batch, echo=echo, progress=progress, budgets=budgets)
    return build_document(pipe, setup, chosen, gap=gap, trace_files=getattr(trace_set, "files", []) or [])


def build_document(pipe, setup: Setup, chosen: dict, *, gap: int, trace_files) -> dict:
    """The schedule coefficient document (``method: schedule``), through the runtime's own builder."""
    n = setup.steps
    rows = dict(sorted(chosen["rows"].items()))
    recommended = recommended_budget(n, list(rows))
    doc = cr.schedule_document_for(
        pipe, steps=n, forecast=chosen["forecast"], recommended=recommended,
        schedules={b: split_by_component(r["path"], setup.components, setup.component_of) for b, r in rows.items()})
    for entry in doc["schedules"]:
        row = rows[entry["budget"]]
        entry["search"] = row["search"]
        entry["error"] = row["error"]
    doc["forecast"]["selection"] = {"held_out_geometric_mean_error": {k: round(math.exp(v), 6)
                                                                      for k, v in chosen["scores"].items()}}
    doc["model"]["source"] = setup.source
    doc["calibration"] = {
        "method": "measured segment errors + dynamic programming (min-sum and lexicographic minimax), the better "
                  "schedule per budget on held-out prompts",
        "trace_files": [str(f) for f in trace_files],
        "steps": [n],
        "guidance": [setup.guidance],
        "num_prompts": len(setup.measure_prompts) + len(setup.holdout_prompts),
        "num_seeds": len(setup.seeds),
        "gap": gap,
        "measured_prompts": list(setup.measure_prompts),
        "holdout_prompts": list(setup.holdout_prompts),
        "seeds": list(setup.seeds),
        "error_metric": ERROR_METRIC,
        "forecast_candidates": {k: round(math.exp(v), 6) for k, v in chosen["scores"].items()},
        "forecast_choice": f"{forecast_key(chosen['forecast'])}: lowest geometric-mean held-out error over the budgets "
                           f"below {n}",
    }
    return doc


def recommended_budget(n: int, budgets: list[int]) -> int:
    """The largest budget computing at most half the steps (2x fewer forwards), else the smallest there is."""
    ok = [b for b in budgets if b <= RECOMMENDED_COMPUTE_FRACTION * n + 1e-9]
    return max(ok) if ok else min(budgets)


def format_schedules(doc: dict) -> str:
    n = doc["steps"]
    lines = [f"{'budget':>6}  {'computed':>8}  {'fwd x':>6}  {'search':>7}  {'held-out err':>12}  steps"]
    rec = (doc.get("recommended") or {}).get("budget")
    for s in doc["schedules"]:
        steps = sorted({x for v in s["components"].values() for x in v})
        mark = "  <- recommended" if s["budget"] == rec else ""
        lines.append(f"{s['budget']:>6}  {s['budget'] / n:>8.1%}  {n / s['budget']:>5.2f}x  {s['search']:>7}  "
                     f"{s['error']['holdout_latent_rel_l1']:>12.5f}  {','.join(map(str, steps))}{mark}")
    return "\n".join(lines)


def choose_budget(doc: dict, goal: TuneGoal, cost_model: dict | None = None) -> tuple[dict, bool]:
    """``(schedule entry, reached)`` for a ``calib tune`` goal: ``--speedup S`` / ``--compute-fraction F`` take
    the largest budget computing at most ``1/S`` (``F``) of the steps (with ``cost_model``, ``--speedup`` is
    wall-clock); ``--max-error E`` the smallest budget whose held-out error is at most ``E``."""
    n = doc["steps"]
    entries = sorted(doc["schedules"], key=lambda e: e["budget"])
    if goal.kind == "max_error":
        ok = [e for e in entries if (e.get("error") or {}).get("holdout_latent_rel_l1", math.inf) <= goal.value]
        return (ok[0], True) if ok else (entries[-1], False)
    fraction = goal.fraction
    if cost_model is not None and goal.kind == "speedup":
        fraction = wall_target_fraction(cost_model, goal.value)
    ok = [e for e in entries if e["budget"] / n <= fraction + 1e-12]
    return (ok[-1], True) if ok else (entries[0], False)


def fit(traces, options: ScheduleOptions, context: FitContext) -> Fitted:
    """Measure, search and compare with the model the job loaded (``context.pipe``), keeping the segment errors in
    ``context.segments``; no document for a ``--shard`` run."""
    doc = fit_schedule(context.pipe, traces, source=context.model, store=context.segments, gap=options.gap,
                       forecasts=options.forecasts, overwrite=options.overwrite, seeds=options.seeds,
                       echo=context.echo, progress=context.progress)
    return Fitted(doc)


def describe(doc: dict) -> list[str]:
    calibration = doc.get("calibration") or {}
    lines = [format_schedules(doc)]
    if "forecast_candidates" in calibration:
        lines.append(f"forecast {calibration['forecast_choice']}; held-out error per candidate: "
                     + ", ".join(f"{k} {v:.5f}" for k, v in calibration["forecast_candidates"].items()))
    lines.append(f"{len(doc['schedules'])} budgets; recommended {doc['recommended']['budget']} of {doc['steps']} "
                 "steps")
    return lines


def tune(doc: dict, goal: TuneGoal, context: TuneContext) -> Tuned:
    """The budget for ``goal``, from the file alone (static schedules per budget: no traces needed)."""
    echo = context.echo
    cost_model = context.cost_model()
    entry, reached = choose_budget(doc, goal, cost_model)
    n = doc["steps"]
    shown = dict(doc, recommended={"budget": entry["budget"]})
    echo(format_schedules(shown).replace("<- recommended", "<- chosen"))
    wall = ""
    if cost_model is not None:
        wall = f", predicted {predicted_wall_speedup(cost_model, entry['budget'] / n):.2f}x wall-clock"
    err = (entry.get("error") or {}).get("holdout_latent_rel_l1")
    what = f"budget {entry['budget']} of {n} steps ({entry['budget'] / n:.1%}, {n / entry['budget']:.2f}x fewer " \
           f"forwards{wall}, held-out error {err if err is None else f'{err:.5f}'})"
    if reached:
        echo(f"--{goal.option} {goal.value:g}: {what}")
    else:
        echo(f"--{goal.option} {goal.value:g} cannot be reached by this file's schedules; closest: {what}")
    if cost_model is None and goal.kind == "speedup":
        echo("note: this speed-up counts transformer forwards; for a wall-clock target run `calib eval --out "
             "results.json` once and pass `--costs results.json`")
    doc["recommended"] = {"budget": entry["budget"]}
    return Tuned(doc, f"budget {entry['budget']}", {"budget": entry["budget"], "reached": reached, "entry": entry})
