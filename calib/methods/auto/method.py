"""``calib fit --method auto``: fit the gate (TeaCache's rescaler) and the searched schedule, run both with the
forecast the schedule fit chose on the same held-out prompts at the requested budget, and keep the better one.

Both candidates are calibrated on the trace's prompts minus the held-out ones
(:func:`calib.methods.schedule.measure.split_prompts`)
and compared on those held-out prompts x the traced seeds, by the latent rel-L1 of the final output against the
uncached one — the measure the frontier reports. The gate's threshold is the one whose *measured* fraction of full
forwards on the held-out runs is closest to the budget without exceeding it (bisection over real runs, starting from
``calib tune``'s replay), so both spend the same compute.
"""

from __future__ import annotations

import math

import numpy as np

import calib.runtime as cr
from calib.coeffs.validate import validate_document
from calib.errors import CalibError
from calib.methods.auto.options import CANDIDATE_SUFFIXES, AutoOptions
from calib.methods.base import FitContext, Fitted, TuneGoal
from calib.methods.schedule.measure import Runner, batches, per_sample_rel_l1, setup_from_traces
from calib.methods.schedule import METHOD as SCHEDULE
from calib.methods.schedule.method import choose_budget, fit_schedule
from calib.methods.search import measured_search
from calib.methods.teacache import METHOD as TEACACHE
from calib.methods.teacache.method import fit as fit_gate
from calib.methods.teacache.options import TeacacheOptions
from calib.methods.teacache.tune import find_threshold, rescalers_of
from calib.runtime import Forecast
from calib.runtime.loading import parse

GATE_PROBES = 6


def _gate_runs(pipe, setup, coeffs_doc, forecast, fraction: float, trace_set, *, batch: int = 16, echo=print):
    """(threshold, measured fraction, held-out error) of the gate + forecast nearest ``fraction`` from below."""
    config = parse(coeffs_doc, "<auto: teacache>")
    rescalers, indicator, normalization = rescalers_of(coeffs_doc)
    guess = find_threshold(trace_set, rescalers, TuneGoal("compute_fraction", fraction), indicator=indicator,
                           normalization=normalization)[0].threshold
    runner = Runner(pipe, batches(setup.holdout_prompts, setup.seeds, batch), steps=setup.steps,
                    guidance=setup.guidance, pipeline_kwargs=setup.pipeline_kwargs)
    probes: dict[float, tuple[float, float]] = {}

    def measure(t: float) -> float:
        t = float(f"{t:.6g}")
        if t not in probes:
            errors = []
            handle = cr.apply(pipe, config, threshold=t, forecast=forecast)
            try:
                for job in runner.jobs:
                    errors.extend(per_sample_rel_l1(runner.references[job], runner.generate(job)))
                stats = handle.stats()
            finally:
                handle.remove()
            probes[t] = (stats["compute_fraction"], float(np.mean(errors)))
        return probes[t][0]

    try:  # the gate's measured fraction on the held-out runs, as near the budget as GATE_PROBES runs get it
        measured_search(measure, fraction + 1e-9, guess, max_probes=GATE_PROBES)
    finally:
        runner.close()
    fitting = {t: v for t, v in probes.items() if v[0] <= fraction + 1e-9}
    pool = fitting or probes
    t = min(pool, key=lambda k: (abs(pool[k][0] - fraction), pool[k][1]))
    return t, pool[t][0], pool[t][1]


def gate_forecast(gate_doc: dict, fallback):
    """The forecast the gate runs with: its own (``calib fit --forecast`` chose one of order >= 1 on the traced
    forecast errors), else ``fallback`` (the schedule fit's, chosen on held-out generations)."""
    own = [c.get("forecast") for c in gate_doc["components"].values() if (c.get("forecast") or {}).get("order")]
    if own:
        return Forecast.from_json(own[0]), "the gate file's"
    return fallback, "the schedule fit's"


def compare(pipe, setup, gate_doc, schedule_doc, entry, reached, forecast, fraction, trace_set, *, echo=print) -> dict:
    """Gate + forecast (threshold bisected over held-out runs to <= ``fraction``) against the schedule ``entry``
    (its held-out error was measured on the same jobs by the schedule fit); the verdict, with why. The gate runs
    with its file's forecast where it has one, else with ``forecast``."""
    schedule_forecast = forecast
    forecast, whose = gate_forecast(gate_doc, forecast)
    echo(f"  the gate forecasts with {whose} forecast {forecast.as_json()}")
    n = schedule_doc["steps"]
    sched_fraction, sched_error = entry["budget"] / n, entry["error"]["holdout_latent_rel_l1"]
    threshold, gate_fraction, gate_error = _gate_runs(pipe, setup, gate_doc, forecast, fraction, trace_set,
                                                      echo=echo)
    echo(f"  gate + forecast:     threshold {threshold:g}, {gate_fraction:.1%} of full forwards, held-out latent "
         f"rel-L1 {gate_error:.5f}")
    echo(f"  schedule + forecast: budget {entry['budget']} of {n}, {sched_fraction:.1%} of full forwards, held-out "
         f"latent rel-L1 {sched_error:.5f}" + ("" if reached else " (the fewest this file has)"))
    pick_schedule = sched_error <= gate_error
    better, worse = (sched_error, gate_error) if pick_schedule else (gate_error, sched_error)
    margin = (1 - better / worse) if worse > 0 else 0.0
    if not math.isfinite(better):  # pragma: no cover - both errors come from real runs
        raise CalibError("the comparison produced no finite error")
    why = (f"kept {'schedule + forecast' if pick_schedule else 'gate + forecast'}: held-out latent rel-L1 "
           f"{better:.5f} vs {worse:.5f} ({margin:.0%} lower) at <= {fraction:.0%} of full forwards")
    return {
        "target_compute_fraction": fraction,
        "holdout_prompts": list(setup.holdout_prompts),
        "seeds": list(setup.seeds),
        "gate": {"threshold": threshold, "compute_fraction": round(gate_fraction, 6),
                 "holdout_latent_rel_l1": round(gate_error, 6), "forecast": forecast.as_json()},
        "schedule": {"budget": entry["budget"], "compute_fraction": round(sched_fraction, 6),
                     "holdout_latent_rel_l1": round(sched_error, 6), "forecast": schedule_forecast.as_json()},
        "kept": "schedule" if pick_schedule else "gate",
        "why": why,
    }


def beside_path(out, suffix: str):
    """``OUT.json`` -> ``OUT<suffix>`` (the candidates' files)."""
    return out.with_name(out.name[: -len(".json")] + suffix)


def fit(traces, options: AutoOptions, context: FitContext) -> Fitted:
    """Fit the gate and the schedule, compare them at ``--compute-fraction`` on held-out prompts, and return the
    better one's document (with the verdict in ``calibration.auto``); both candidates are written beside it."""
    echo, out, fraction = context.echo, context.out, options.compute_fraction
    paths = {name: beside_path(out, suffix) for name, suffix in CANDIDATE_SUFFIXES.items()}
    setup = setup_from_traces(traces, context.model, seeds=options.seeds)
    echo(f"== 1/3 gate: TeaCache's rescaler -> {paths['gate']}")
    gate_doc = validate_document(fit_gate(traces, TeacacheOptions(plot=False), context).document,
                                 source="<auto: gate>", section_check=TEACACHE.check_section)
    echo(f"\n== 2/3 schedule: measured segments, searched schedules -> {paths['schedule']}")
    schedule_doc = fit_schedule(context.pipe, traces, source=context.model, store=context.segments, gap=options.gap,
                                forecasts=options.forecasts, seeds=options.seeds, echo=echo,
                                progress=context.progress)
    entry, reached = choose_budget(schedule_doc, TuneGoal("compute_fraction", fraction))
    schedule_doc["recommended"] = {"budget": entry["budget"]}
    schedule_doc = validate_document(schedule_doc, source="<auto: schedule>", section_check=SCHEDULE.check_section)
    forecast = Forecast.from_json(schedule_doc["forecast"])
    echo(f"\n== 3/3 compare on {len(setup.holdout_prompts)} held-out prompt(s) x seeds {setup.seeds} at <= "
         f"{fraction:.0%} of full forwards, forecast {forecast.as_json()}")
    verdict = compare(context.pipe, setup, gate_doc, schedule_doc, entry, reached, forecast, fraction, traces,
                      echo=echo)
    verdict["gate"]["file"], verdict["schedule"]["file"] = str(paths["gate"]), str(paths["schedule"])
    beside = {CANDIDATE_SUFFIXES["gate"]: gate_doc, CANDIDATE_SUFFIXES["schedule"]: schedule_doc}
    if verdict["kept"] == "schedule":
        doc = dict(schedule_doc)
    else:
        doc = dict(gate_doc, components={name: dict(comp) for name, comp in gate_doc["components"].items()})
        gate_forecast_used = Forecast.from_json(verdict["gate"]["forecast"])
        for comp in doc["components"].values():
            if not (comp.get("forecast") or {}).get("order"):  # the gate ran with the schedule fit's forecast
                comp["forecast"] = gate_forecast_used.as_json()
        doc["thresholds"] = dict(doc.get("thresholds") or {}, recommended=float(verdict["gate"]["threshold"]))
    doc["calibration"] = dict(doc.get("calibration") or {}, auto=verdict)
    return Fitted(doc, beside=beside)


def describe(doc: dict) -> list[str]:
    verdict = doc["calibration"]["auto"]
    what = "schedule" if verdict["kept"] == "schedule" else "coefficient"
    return [verdict["why"], f"(the {what} file; both candidates are kept beside it)"]
