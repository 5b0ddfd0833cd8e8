"""``calib fit --method auto``: fit the gate (TeaCache's rescaler) and search the schedules (:mod:`calib.methods.
schedule`: computed steps, forecast target and basis chosen together), run the gate with the forecast the search
chose at the requested budget on the same held-out calibration prompts, and keep the better.

Both candidates are calibrated on the trace's prompts minus the held-out ones
(:func:`calib.methods.schedule.measure.split_prompts`) and compared on those held-out prompts x the seeds, by the
latent rel-L1 of the final output against the uncached one — the measure the frontier reports. The gate's threshold
is the one whose *measured* fraction of compute on the held-out runs is closest to the budget without exceeding it
(bisection over real runs, starting from ``calib tune``'s replay), so both spend the same compute. The verdict, with
both errors and why, is the document's ``calibration.auto``.
"""

from __future__ import annotations

import math

import calib.runtime as cr
from calib.coeffs.validate import validate_document
from calib.errors import CalibError
from calib.methods.auto.options import CANDIDATE_SUFFIXES, AutoOptions
from calib.methods.base import FitContext, Fitted, TuneGoal
from calib.methods.progress import Progress
from calib.methods.quality import no_cache
from calib.methods.schedule import METHOD as SCHEDULE
from calib.methods.schedule.joint import PlanRunner
from calib.methods.schedule.measure import batches, setup_from_traces
from calib.methods.schedule.method import choose_budget, fit_schedule
from calib.methods.search import measured_search
from calib.methods.teacache import METHOD as TEACACHE
from calib.methods.teacache.method import fit as fit_gate
from calib.methods.teacache.options import TeacacheOptions
from calib.methods.teacache.tune import find_threshold, rescalers_of
from calib.runtime.bases import LinearForecast
from calib.runtime.loading import parse

GATE_PROBES = 6


def gate_forecast(entry: dict):
    """The forecast the gate runs with: the one the search chose for the compared budget (a weight table made for
    that budget's steps falls back to its Newton rule: a gate's computed steps are not known in advance)."""
    forecast = cr.ForecastSpec.from_json(entry["forecast"])
    return forecast.fallback if isinstance(forecast, LinearForecast) else forecast


def _gate_runs(pipe, setup, coeffs_doc, forecast, fraction: float, trace_set, *, batch: int = 16,
               progress: bool = True):
    """(threshold, measured fraction of compute, held-out error) of the gate + forecast nearest ``fraction`` from
    below; a progress bar counts the runs (each every held-out prompt x seed)."""
    config = parse(coeffs_doc, "<auto: teacache>")
    rescalers, indicator, normalization = rescalers_of(coeffs_doc)
    guess = find_threshold(trace_set, rescalers, TuneGoal("compute_fraction", fraction), indicator=indicator,
                           normalization=normalization)[0].threshold
    runner = PlanRunner(pipe, batches(setup.holdout_prompts, setup.seeds, batch), steps=setup.steps,
                        guidance=setup.guidance, pipeline_kwargs=setup.pipeline_kwargs, components=setup.components,
                        component_of=setup.component_of, log={}, split="gate", save=lambda: None)
    probes: dict[float, tuple[float, float]] = {}
    bar = Progress("gate runs", " run", enabled=progress)  # about GATE_PROBES, one more where the bisection needs it

    def measure(t: float) -> float:
        t = float(f"{t:.6g}")
        if t not in probes:
            error, stats = runner.measure(lambda: cr.apply(pipe, config, threshold=t, forecast=forecast))
            probes[t] = (stats["compute_fraction"], error)
            bar.tick(f"threshold {t:g}: {stats['compute_fraction']:.1%} of compute")
        return probes[t][0]

    try:  # the gate's measured fraction on the held-out runs, as near the budget as GATE_PROBES runs get it
        measured_search(measure, fraction + 1e-9, guess, max_probes=GATE_PROBES)
    finally:
        bar.close()
        runner.close()
    fitting = {t: v for t, v in probes.items() if v[0] <= fraction + 1e-9}
    pool = fitting or probes
    t = min(pool, key=lambda k: (abs(pool[k][0] - fraction), pool[k][1]))
    return t, pool[t][0], pool[t][1]


def compare(pipe, setup, gate_doc, schedule_doc, entry, reached, fraction, trace_set, *, echo=print,
            progress: bool = True) -> dict:
    """Gate + the search's forecast (threshold bisected over held-out runs to <= ``fraction`` of compute) against
    the schedule ``entry`` (its held-out error measured on the same prompts and seeds by the search); the verdict,
    with why."""
    forecast = gate_forecast(entry)
    n = schedule_doc["steps"]
    sched_fraction, sched_error = entry["budget"] / n, entry["error"]["holdout_latent_rel_l1"]
    threshold, gate_fraction, gate_error = _gate_runs(pipe, setup, gate_doc, forecast, fraction, trace_set,
                                                      progress=progress)
    echo(f"  gate + forecast:     threshold {threshold:g}, {gate_fraction:.1%} of compute, held-out latent rel-L1 "
         f"{gate_error:.5f} (forecast {forecast.as_json()})")
    echo(f"  schedule + forecast: budget {entry['budget']:g} of {n}, {sched_fraction:.1%} of compute, held-out "
         f"latent rel-L1 {sched_error:.5f}" + ("" if reached else " (the fewest this file has)"))
    pick_schedule = sched_error <= gate_error
    better, worse = (sched_error, gate_error) if pick_schedule else (gate_error, sched_error)
    margin = (1 - better / worse) if worse > 0 else 0.0
    if not math.isfinite(better):  # pragma: no cover - both errors come from real runs
        raise CalibError("the comparison produced no finite error")
    why = (f"kept {'schedule + forecast' if pick_schedule else 'gate + forecast'}: held-out latent rel-L1 "
           f"{better:.5f} vs {worse:.5f} ({margin:.0%} lower) at <= {fraction:.0%} of compute")
    return {
        "target_compute_fraction": fraction,
        "holdout_prompts": list(setup.holdout_prompts),
        "seeds": list(setup.seeds),
        "gate": {"threshold": threshold, "compute_fraction": round(gate_fraction, 6),
                 "holdout_latent_rel_l1": round(gate_error, 6), "forecast": forecast.as_json()},
        "schedule": {"budget": entry["budget"], "compute_fraction": round(sched_fraction, 6),
                     "holdout_latent_rel_l1": round(sched_error, 6), "forecast": entry["forecast"]},
        "kept": "schedule" if pick_schedule else "gate",
        "why": why,
    }


def beside_path(out, suffix: str):
    """``OUT.json`` -> ``OUT<suffix>`` (the candidates' files)."""
    return out.with_name(out.name[: -len(".json")] + suffix)


def fit(traces, options: AutoOptions, context: FitContext) -> Fitted:
    """Fit the gate, search the schedules, compare them at ``--compute-fraction`` on held-out prompts, and return the
    better one's document (with the verdict in ``calibration.auto``); both candidates are written beside it."""
    echo, out, fraction = context.echo, context.out, options.compute_fraction
    paths = {name: beside_path(out, suffix) for name, suffix in CANDIDATE_SUFFIXES.items()}
    setup = setup_from_traces(traces, context.model, seeds=options.seeds)
    echo(f"== 1/3 gate: TeaCache's rescaler -> {paths['gate']}")
    gate_doc = validate_document(fit_gate(traces, TeacacheOptions(plot=False, max_error=options.max_error),
                                          context).document,
                                 source="<auto: gate>", section_check=TEACACHE.check_section)
    echo(f"\n== 2/3 schedule: computed steps, forecast target and basis, searched together -> {paths['schedule']}")
    fractions = tuple(dict.fromkeys((*options.fractions, fraction)))
    schedule_doc = fit_schedule(context.pipe, traces, source=context.model, log=context.search_log,
                                fractions=fractions, orders=options.forecast_order, targets=options.forecast_targets,
                                variable=options.forecast_variable, cond_only=options.cond_only,
                                max_local=options.search_evals, overwrite=options.overwrite, seeds=options.seeds,
                                echo=echo, progress=context.progress, max_error=options.max_error)
    if no_cache(schedule_doc):
        return _no_cache(schedule_doc, gate_doc, paths, fraction, setup, echo)
    entry, reached = choose_budget(schedule_doc, TuneGoal("compute_fraction", fraction))
    schedule_doc["recommended"] = {"budget": entry["budget"]}
    schedule_doc["forecast"] = entry["forecast"]
    schedule_doc = validate_document(schedule_doc, source="<auto: schedule>", section_check=SCHEDULE.check_section)
    echo(f"\n== 3/3 compare on {len(setup.holdout_prompts)} held-out prompt(s) x seeds {setup.seeds} at <= "
         f"{fraction:.0%} of compute")
    verdict = compare(context.pipe, setup, gate_doc, schedule_doc, entry, reached, fraction, traces, echo=echo,
                      progress=context.progress)
    verdict["gate"]["file"], verdict["schedule"]["file"] = str(paths["gate"]), str(paths["schedule"])
    # each candidate file is what was measured: the gate with the search's forecast at the compared threshold
    forecast = verdict["gate"]["forecast"]
    gate_doc = dict(gate_doc, components={name: dict(comp, forecast=forecast)
                                          for name, comp in gate_doc["components"].items()})
    gate_doc["thresholds"] = dict(gate_doc.get("thresholds") or {}, recommended=float(verdict["gate"]["threshold"]))
    gate_doc = validate_document(gate_doc, source="<auto: gate>", section_check=TEACACHE.check_section)
    beside = {CANDIDATE_SUFFIXES["gate"]: gate_doc, CANDIDATE_SUFFIXES["schedule"]: schedule_doc}
    doc = dict(schedule_doc if verdict["kept"] == "schedule" else gate_doc)
    bar = options.max_error
    kept_error = verdict[verdict["kept"]]["holdout_latent_rel_l1"]
    if kept_error > bar:
        # the better candidate at this budget is over the quality bar: the schedule's own recommendation (the
        # budget its search measured within the bar, up to the cheapest skip) is what the file recommends
        within = schedule_doc["recommendation"]["chosen"]
        verdict["why"] += (f"; held-out latent rel-L1 {kept_error:.5f} at <= {fraction:.0%} of compute is over the "
                           f"quality bar {bar:g}: the file recommends budget {within['budget']:g} of "
                           f"{schedule_doc['steps']} (held-out {within['error']:.5f})")
        verdict["over_bar"], verdict["kept"] = True, "schedule"
        doc = dict(schedule_doc, recommended={"budget": within["budget"]},
                   forecast=next(e["forecast"] for e in schedule_doc["schedules"] if e["budget"] == within["budget"]))
    doc["calibration"] = dict(doc.get("calibration") or {}, auto=verdict)
    return Fitted(doc, beside=beside)


def _no_cache(schedule_doc, gate_doc, paths, fraction, setup, echo) -> Fitted:
    """No skip the schedule search measured (down to the cheapest, one step fewer) keeps the quality bar: the
    schedule file that computes every step, with the verdict; no comparison at a budget both would fail."""
    reason = schedule_doc["recommendation"]["reason"]
    echo(f"\n== 3/3 no comparison: {reason}")
    verdict = {
        "target_compute_fraction": fraction,
        "holdout_prompts": list(setup.holdout_prompts),
        "seeds": list(setup.seeds),
        "gate": {"file": str(paths["gate"]), "recommendation": gate_doc.get("recommendation")},
        "schedule": {"file": str(paths["schedule"])},
        "kept": "no cache",
        "why": reason,
    }
    beside = {CANDIDATE_SUFFIXES["gate"]: gate_doc, CANDIDATE_SUFFIXES["schedule"]: schedule_doc}
    doc = dict(schedule_doc)
    doc["calibration"] = dict(doc.get("calibration") or {}, auto=verdict)
    return Fitted(doc, beside=beside)


def describe(doc: dict) -> list[str]:
    verdict = doc["calibration"]["auto"]
    if verdict["kept"] == "no cache":
        return [verdict["why"], "(a schedule file whose recommended budget computes every step; both candidates are "
                "kept beside it)"]
    what = "schedule" if verdict["kept"] == "schedule" else "coefficient"
    return [verdict["why"], f"(the {what} file; both candidates are kept beside it)"]
