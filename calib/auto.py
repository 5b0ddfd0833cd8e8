"""``calib fit --method auto``: fit the gate (TeaCache's rescaler) and the searched schedule, run both with the
forecast the schedule fit chose on the same held-out prompts at the requested budget, and keep the better one.

Both candidates are calibrated on the trace's prompts minus the held-out ones (:func:`calib.schedule.split_prompts`)
and compared on those held-out prompts x the traced seeds, by the latent rel-L1 of the final output against the
uncached one — the measure the frontier reports. The gate's threshold is the one whose *measured* fraction of full
forwards on the held-out runs is closest to the budget without exceeding it (bisection over real runs, starting from
``calib tune``'s replay), so both spend the same compute.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import CalibError

DEFAULT_FRACTION = 0.5
GATE_PROBES = 6


def _gate_runs(pipe, setup, coeffs_doc, forecast, fraction: float, trace_set, *, batch: int = 16, echo=print):
    """(threshold, measured fraction, held-out error) of the gate + forecast nearest ``fraction`` from below."""
    import calib.runtime as cr

    from .runtime.loading import parse
    from .methods.base import TuneTarget
    from .methods.schedule import Runner, _jobs
    from .methods.teacache.tune import find_threshold, rescalers_of

    config = parse(coeffs_doc, "<auto: teacache>")
    rescalers, indicator, normalization = rescalers_of(coeffs_doc)
    guess = find_threshold(trace_set, rescalers, TuneTarget("compute_fraction", fraction), indicator=indicator,
                           normalization=normalization)[0].threshold
    runner = Runner(pipe, _jobs(setup.holdout_prompts, setup.seeds, batch), steps=setup.steps,
                    guidance=setup.guidance, pipeline_kwargs=setup.pipeline_kwargs)
    probes: dict[float, tuple[float, float]] = {}

    def measure(t: float) -> float:
        t = float(f"{t:.6g}")
        if t not in probes:
            errors = []
            handle = cr.apply(pipe, config, threshold=t, forecast=forecast)
            try:
                for job in runner.jobs:
                    from .methods.schedule import per_sample_rel_l1

                    errors.extend(per_sample_rel_l1(runner.references[job], runner._generate(job)))
                stats = handle.stats()
            finally:
                handle.remove()
            probes[t] = (stats["compute_fraction"], float(np.mean(errors)))
        return probes[t][0]

    try:
        lo, hi = 0.0, max(guess, 1e-4)
        while measure(hi) > fraction + 1e-9 and len(probes) < GATE_PROBES:
            lo, hi = hi, hi * 2
        for _ in range(GATE_PROBES):
            if len(probes) >= GATE_PROBES:
                break
            mid = 0.5 * (lo + hi)
            if measure(mid) > fraction + 1e-9:
                lo = mid
            else:
                hi = mid
    finally:
        runner.close()
    fitting = {t: v for t, v in probes.items() if v[0] <= fraction + 1e-9}
    pool = fitting or probes
    t = min(pool, key=lambda k: (abs(pool[k][0] - fraction), pool[k][1]))
    return t, pool[t][0], pool[t][1]


def run_auto(traces, *, out=None, fraction: float = DEFAULT_FRACTION, gap=None, orders=None, variable=None,
             device=None, seeds=None, echo=print) -> Path:
    """``calib fit --method auto --compute-fraction F``: writes the better of gate + forecast and schedule +
    forecast for that budget to ``out`` and says why."""
    from .coeffs.io import load_document, write_document
    from .jobs.fit import default_schedule_out as default_out
    from .jobs.fit import run_teacache_fit
    from .methods import registry
    from .methods.base import TuneTarget
    from .methods.schedule import DEFAULT_GAP, choose_budget, fit_schedule, parse_candidates, setup_from_traces
    from .models.loading import load_model
    from .store import read_traces
    from .trace import pick_device

    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise CalibError(f"--compute-fraction must be in (0, 1) for --method auto, got {fraction!r}")
    out = Path(out) if out is not None else default_out(traces).with_name(
        default_out(traces).name.replace(".schedule.json", ".json"))
    if out.suffix.lower() != ".json":
        raise CalibError(f"--out {out}: the coefficient file must end in .json")
    trace_set = read_traces([Path(t) for t in traces])
    setup = setup_from_traces(trace_set, seeds=seeds)
    pipe = load_model(setup.source, device=pick_device(device))
    stem = out.name[: -len(".json")]
    gate_path = out.with_name(f"{stem}.gate.json")
    schedule_path = out.with_name(f"{stem}.schedule.json")

    echo(f"== 1/3 gate: TeaCache's rescaler -> {gate_path}")
    run_teacache_fit([Path(t) for t in traces], out=gate_path, plot=False, echo=echo)
    echo(f"\n== 2/3 schedule: measured segments, searched schedules -> {schedule_path}")
    schedule_doc = fit_schedule(pipe, trace_set, out=schedule_path, gap=DEFAULT_GAP if gap is None else gap,
                                candidates=parse_candidates(orders, variable), seeds=seeds, echo=echo)
    target = TuneTarget("compute_fraction", fraction)
    entry, reached = choose_budget(schedule_doc, target)
    schedule_doc["recommended"] = {"budget": entry["budget"]}
    write_document(schedule_doc, schedule_path, validate=registry.validate)
    forecast_entry = schedule_doc["forecast"]
    from .runtime import Forecast

    forecast = Forecast(order=int(forecast_entry["order"]), variable=forecast_entry.get("variable", "step"))
    echo(f"\n== 3/3 compare on {len(setup.holdout_prompts)} held-out prompt(s) x seeds {setup.seeds} at <= "
         f"{fraction:.0%} of full forwards, forecast {forecast.as_json()}")
    gate_doc = load_document(gate_path, validate=registry.validate)
    verdict = compare(pipe, setup, gate_doc, schedule_doc, entry, reached, forecast, fraction, trace_set, echo=echo)
    forecast = Forecast(order=verdict["gate"]["forecast"]["order"],
                        variable=verdict["gate"]["forecast"].get("variable", "step"))
    verdict["gate"]["file"], verdict["schedule"]["file"] = str(gate_path), str(schedule_path)
    pick_schedule, threshold, why = verdict["kept"] == "schedule", verdict["gate"]["threshold"], verdict["why"]
    if pick_schedule:
        doc = schedule_doc
    else:
        doc = gate_doc
        for comp in doc["components"].values():
            if not (comp.get("forecast") or {}).get("order"):  # the gate ran with the schedule fit's forecast
                comp["forecast"] = forecast.as_json()
        doc.setdefault("thresholds", {})["recommended"] = float(threshold)
    doc.setdefault("calibration", {})["auto"] = verdict
    write_document(doc, out, validate=registry.validate)
    echo(why)
    echo(f"wrote {out} (the {'schedule' if pick_schedule else 'coefficient'} file; both candidates kept beside it)")
    return out


def gate_forecast(gate_doc: dict, fallback):
    """The forecast the gate runs with: its own (``calib fit --forecast`` chose one of order >= 1 on the traced
    forecast errors), else ``fallback`` (the schedule fit's, chosen on held-out generations)."""
    from .runtime import Forecast

    own = [c.get("forecast") for c in gate_doc["components"].values() if (c.get("forecast") or {}).get("order")]
    if own:
        return Forecast(order=int(own[0]["order"]), variable=own[0].get("variable", "step")), "the gate file's"
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
