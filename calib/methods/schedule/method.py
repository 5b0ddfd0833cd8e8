"""``calib fit --method schedule``: which steps compute, what the others forecast and how, chosen together per
budget by measuring the final error of the served pipeline call (:mod:`.joint`, the search; :mod:`.measure`, the
served call and the prompt split).

For each fraction of compute asked for (``--fractions``, by default 50 %, 33 % and 25 %) the search keeps one plan of
computed steps (with cond-only steps where the traced pipeline batches guidance) and one forecast (target and basis)
and records its error on held-out calibration prompts and what else it compared. Every measurement is kept in the
search log the job opens beside the output (``OUT.search.json``, :mod:`calib.store.search_log`), so an interrupted
run resumes; ``--shard I/N`` searches the shard's share of the budgets into ``OUT.search.rankI-of-N.json`` and a run
without ``--shard`` then reads every shard's file and writes the schedule file.
"""

from __future__ import annotations

import math

import calib.runtime as cr
from calib.coeffs.header import with_signature
from calib.errors import CalibError
from calib.methods.base import FitContext, Fitted, TuneContext, TuneGoal, Tuned
from calib.methods.cost_model import predicted_wall_speedup, wall_target_fraction
from calib.methods.progress import Progress
from calib.methods.schedule.joint import (MAX_LOCAL_EVALS, PlanRunner, budget_for, forecast_candidates,
                                          search_budget)
from calib.methods.schedule.measure import Setup, batches, setup_from_traces, split_by_component
from calib.methods.quality import DEFAULT_MAX_ERROR, no_cache, recommendation
from calib.methods.schedule.options import DEFAULT_FRACTIONS, DEFAULT_ORDERS, ScheduleOptions

RECOMMENDED_COMPUTE_FRACTION = 0.5
ERROR_METRIC = ("mean over the prompts x seeds of the relative L1 change of the final latents against the uncached "
                "generation of the same prompt and seed")
TARGETS = ("output", "hidden", "residual")


def fit_schedule(pipe, trace_set, *, source: str, log, fractions=DEFAULT_FRACTIONS, orders=DEFAULT_ORDERS,
                 targets=TARGETS, variable: str = "step", cond_only: bool = True, max_local: int = MAX_LOCAL_EVALS, overwrite: bool = False,
                 seeds=None, prompts=None, batch: int = 16, echo=print, progress: bool = True,
                 max_error: float = DEFAULT_MAX_ERROR) -> dict | None:
    """Search every budget and return the schedule document (None for a run of one shard of the log, which only
    searches its budgets). ``source``: the model ``pipe`` was loaded from; ``log``: the job's
    :class:`~calib.store.search_log.SearchLog`. Where no budget's held-out error keeps the quality bar ``max_error``
    (:mod:`calib.methods.quality`), the cheapest skip (one step fewer) is searched too, and where that fails the
    bar as well the document recommends no cache (the budget of every step)."""
    setup = setup_from_traces(trace_set, source, prompts=prompts, seeds=seeds)
    n = setup.steps
    if n < 3:
        raise CalibError(f"a schedule needs at least 3 steps; the traces have {n}")
    halves = cond_only and setup.cfg_batched
    forecasts = forecast_candidates(cfg_batched=halves, targets=targets, orders=orders, variable=variable)
    budgets = sorted({budget_for(f, n, halves=halves) for f in fractions}, reverse=True)
    key = setup.key({"forecasts": [f.name for f in forecasts], "budgets": budgets, "max_local": max_local})
    if overwrite:
        log.clear()
    entries = log.read(key)
    shard = log.shard
    mine = budgets if shard is None else budgets[shard[0]::shard[1]]
    required = sorted({0} | ({setup.component_of.index(c) for c in setup.components}
                             if setup.component_of is not None else set()))
    where = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    echo(f"schedule search{where}: {setup.describe()}; budgets {', '.join(f'{b:g}' for b in mine)} of {n} steps; "
         f"{len(forecasts)} forecasts ({', '.join(f.name for f in forecasts)}); measured on "
         f"{len(setup.measure_prompts)} prompt(s), chosen on {len(setup.holdout_prompts)} held-out prompt(s), "
         f"seeds {setup.seeds}; {len(entries)} measurements already in {log.path.name}")

    def save():
        log.write(key, entries)

    def runner(prompts_, split):
        return PlanRunner(pipe, batches(prompts_, setup.seeds, batch), steps=n, guidance=setup.guidance,
                          pipeline_kwargs=setup.pipeline_kwargs, components=setup.components,
                          component_of=setup.component_of, log=entries, split=split, save=save)

    measure, holdout = runner(setup.measure_prompts, "measure"), runner(setup.holdout_prompts, "holdout")
    bar = Progress("schedule search", " measurement", enabled=progress)
    found = {}
    try:
        for budget in mine:
            found[budget] = search_budget(measure, holdout, budget, forecasts, cond_only=halves, required=required,
                                          max_local=max_local, tick=bar.tick)
            bar.say(echo, f"  budget {found[budget].budget:g}: {found[budget].plan.key()} with "
                          f"{found[budget].forecast.name}: held-out latent rel-L1 {found[budget].holdout_error:.5f}")
        cheapest = n - (0.5 if halves else 1.0)  # one step fewer (half of one, where a cond-only step can be)
        if (shard is None and found and cheapest not in found and cheapest >= 2
                and not any(f.holdout_error <= max_error for f in found.values())):
            bar.say(echo, f"  no budget keeps the quality bar {max_error:g}: searching the cheapest skip, budget "
                          f"{cheapest:g}")
            found[cheapest] = search_budget(measure, holdout, cheapest, forecasts, cond_only=halves,
                                            required=required, max_local=max_local, tick=bar.tick)
            bar.say(echo, f"  budget {cheapest:g}: {found[cheapest].plan.key()} with "
                          f"{found[cheapest].forecast.name}: held-out latent rel-L1 "
                          f"{found[cheapest].holdout_error:.5f}")
    finally:
        bar.close()  # before any message (a failed save's too), so it starts on a line of its own
        try:
            save()  # Ctrl-C keeps what was measured
        finally:
            measure.close()
            holdout.close()
    if shard is not None:
        echo(f"shard {shard[0]}/{shard[1]} searched; once every shard is done, run the same command without --shard "
             "to write the schedule file")
        return None
    return with_signature(build_document(pipe, setup, found, trace_files=getattr(trace_set, "files", []) or [],
                                         max_error=max_error), trace_set)


def build_document(pipe, setup: Setup, found: dict, *, trace_files, max_error: float = DEFAULT_MAX_ERROR) -> dict:
    """The schedule coefficient document (``method: schedule``), through the runtime's own builder: one entry per
    budget with its computed and cond-only steps, its forecast and its errors. The recommended budget is chosen
    among those whose held-out error keeps ``max_error``; where none does, the document gets the budget of every
    step, recommends it (no cache) and says why in its ``recommendation``."""
    n = setup.steps
    rows = dict(sorted(found.items()))
    passing = [b for b, f in rows.items() if f.holdout_error <= max_error]
    recommended = recommended_budget(n, passing) if passing else n
    cheapest = min(rows.values(), key=lambda f: (f.holdout_error, -f.budget))
    schedules = {b: split_by_component(f.plan.full, setup.components, setup.component_of) for b, f in rows.items()}
    if not passing:
        schedules[n] = split_by_component(range(n), setup.components, setup.component_of)
    doc = cr.schedule_document_for(pipe, steps=n, forecast=cheapest.forecast.spec, recommended=recommended,
                                   schedules=schedules)
    chosen = None
    if passing:
        doc["forecast"] = rows[recommended].forecast.spec.as_json()
        chosen = {"budget": recommended, "compute_fraction": round(recommended / n, 6),
                  "error": round(rows[recommended].holdout_error, 6)}
    doc["recommendation"] = recommendation(
        cache=bool(passing), max_error=max_error, steps=n, basis="measured", chosen=chosen,
        scope="searched budgets down to one step fewer than every step, on the held-out calibration prompts",
        cheapest={"error": round(cheapest.holdout_error, 6), "budget": cheapest.budget,
                  "compute_fraction": round(cheapest.budget / n, 6), "plan": cheapest.plan.key(),
                  "forecast": cheapest.forecast.name,
                  "skip": f"budget {cheapest.budget:g} of {n}: steps {cheapest.plan.key()} with "
                          f"{cheapest.forecast.name}"})
    for entry in doc["schedules"]:
        if entry["budget"] not in rows:  # the budget of every step: the uncached generation itself
            entry["error"] = {"holdout_latent_rel_l1": 0.0, "note": "every step computes (no cache)"}
            continue
        result = rows[entry["budget"]]
        entry["search"] = "measured"
        entry["forecast"] = result.forecast.spec.as_json()
        if result.plan.cond_only:
            entry["cond_only"] = split_by_component(result.plan.cond_only, setup.components, setup.component_of)
        entry["error"] = result.entry()
    doc["model"]["source"] = setup.source
    doc["calibration"] = {
        "method": "joint search of computed steps, forecast target and basis over measured generations of the "
                  "served call; the best of the finalists on held-out calibration prompts per budget",
        "trace_files": [str(f) for f in trace_files],
        "steps": [n],
        "guidance": [setup.guidance],
        "num_prompts": len(set(setup.measure_prompts) | set(setup.holdout_prompts)),
        "num_seeds": len(setup.seeds),
        "measured_prompts": list(setup.measure_prompts),
        "holdout_prompts": list(setup.holdout_prompts),
        "seeds": list(setup.seeds),
        "error_metric": ERROR_METRIC,
    }
    if setup.cfg is not None:  # cache-dit counts one call per branch as a step unless told (calib.exports)
        doc["calibration"]["cfg"] = setup.cfg
    if setup.pipeline is not None:
        doc["calibration"]["pipeline"] = setup.pipeline
    return doc


def recommended_budget(n: int, budgets: list) -> float:
    """The largest budget computing at most half the steps (2x fewer forwards), else the smallest there is (of the
    budgets that keep the quality bar)."""
    ok = [b for b in budgets if b <= RECOMMENDED_COMPUTE_FRACTION * n + 1e-9]
    return max(ok) if ok else min(budgets)


def format_schedules(doc: dict) -> str:
    n = doc["steps"]
    lines = [f"{'budget':>6}  {'compute':>7}  {'fwd x':>6}  {'held-out err':>12}  {'forecast':<22}  steps (c: cond-only)"]
    rec = (doc.get("recommended") or {}).get("budget")
    for s in doc["schedules"]:
        full = sorted({x for v in s["components"].values() for x in v})
        partial = sorted({x for v in (s.get("cond_only") or {}).values() for x in v})
        steps = sorted([(x, "") for x in full] + [(x, "c") for x in partial])
        forecast = s.get("forecast") or doc.get("forecast") or {}
        name = (s.get("error") or {}).get("forecast") or _forecast_name(forecast)
        mark = "  <- recommended" if s["budget"] == rec else ""
        err = (s.get("error") or {}).get("holdout_latent_rel_l1")
        lines.append(f"{s['budget']:>6g}  {s['budget'] / n:>7.1%}  {n / s['budget']:>5.2f}x  "
                     f"{'-' if err is None else f'{err:.5f}':>12}  {name:<22}  "
                     f"{','.join(f'{x}{c}' for x, c in steps)}{mark}")
    return "\n".join(lines)


def _forecast_name(entry: dict) -> str:
    if entry.get("kind") == "cfg":
        return f"cfg-cond{entry['cond'].get('order', '?')}-diff{entry['diff'].get('order', '?')}"
    return f"{entry.get('target', 'residual')}-{entry.get('kind', 'newton')}{entry.get('order', '')}"


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
    """Search with the model the job loaded (``context.pipe``), keeping every measurement in ``context.search_log``;
    no document for a ``--shard`` run."""
    doc = fit_schedule(context.pipe, traces, source=context.model, log=context.search_log,
                       fractions=options.fractions, orders=options.forecast_order, targets=options.forecast_targets,
                       variable=options.forecast_variable, cond_only=options.cond_only,
                       max_local=options.search_evals, overwrite=options.overwrite,
                       seeds=options.seeds, echo=context.echo, progress=context.progress,
                       max_error=options.max_error)
    return Fitted(doc)


def describe(doc: dict) -> list[str]:
    lines = [format_schedules(doc), f"{len(doc['schedules'])} budgets; recommended {doc['recommended']['budget']:g} "
             f"of {doc['steps']} steps"]
    reason = (doc.get("recommendation") or {}).get("reason")
    return lines + ([reason] if reason else [])


def tune(doc: dict, goal: TuneGoal, context: TuneContext) -> Tuned:
    """The budget for ``goal``, from the file alone (static schedules per budget: no traces needed)."""
    echo = context.echo
    if no_cache(doc):  # the fit measured no skip within its quality bar: the file's budget computes every step
        echo(format_schedules(doc))
        echo(f"{doc['recommendation']['reason']} (--{goal.option} {goal.value:g} not applied; the recommended budget "
             f"{doc['recommended']['budget']:g} computes every step)")
        return Tuned(doc, "no cache (every step computes)",
                     {"budget": doc["recommended"]["budget"], "reached": False, "no_cache": True})
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
