"""TeaCache's fit, tune and description (the CacheMethod's work; calib.methods.teacache.METHOD names it)."""

from __future__ import annotations

import warnings

from calib.errors import CalibError
from calib.methods.base import FitContext, Fitted, TuneContext, TuneGoal, Tuned
from calib.methods.cost_model import predicted_wall_speedup, wall_target_fraction
from calib.methods.teacache.components import build_document
from calib.methods.teacache.figure import plot_fit_png
from calib.methods.teacache.fit import (check_settings, fit_all_components, format_diagnostics, format_fit_report,
                                        runtime_rescaler, select_indicator)
from calib.methods.teacache.forecast import choose_forecast
from calib.methods.teacache.options import INDICATORS, NORMALIZATIONS, TeacacheOptions
from calib.methods.teacache.rescalers import WIDE_BAND
from calib.methods.quality import no_cache
from calib.methods.teacache.tune import (find_threshold, fit_recommendation, format_table, rescalers_of,
                                         skip_verdict, threshold_table, tune_table, tuned_thresholds_section)
from calib.store import pipeline_settings, settings_difference


def fit(traces, options: TeacacheOptions, context: FitContext) -> Fitted:
    """The indicator (auto: by held-out error), the rescaler per component, the forecast of the skipped steps and
    the threshold table replayed on the traces; the figure is the fit's PNG."""
    echo = context.echo
    check_settings(traces, options.allow_mixed)
    common = dict(degree=options.degree, streams=options.streams, robust=options.robust)
    indicator, normalization, choice = options.indicator, options.normalization, None
    if indicator == "auto" or normalization == "auto":
        choice = select_indicator(traces, **common,
                                  indicators=list(INDICATORS) if indicator == "auto" else [indicator],
                                  normalizations=list(NORMALIZATIONS) if normalization == "auto" else [normalization])
        indicator, normalization = choice.indicator, choice.normalization
    common.update(indicator=indicator, normalization=normalization)
    # TeaCache's fit first: whatever is wrong with the traces is reported as it always was.
    fits = fit_all_components(traces, bootstrap=options.bootstrap, **common)
    forecast = choose_forecast(traces, options.forecast, options.forecast_variable, echo=echo, **common)
    if forecast is not None:
        if forecast.refits:  # the rescaler maps the forecast's error: fitted again on it
            fits = fit_all_components(traces, bootstrap=options.bootstrap, forecast=forecast.forecast,
                                      objective=forecast.objective, forecast_entry=forecast.entry(), **common)
        else:  # the rescaler maps the output change: the fit above, with the forecast recorded beside it
            for res in fits.values():
                res.forecast_entry = forecast.entry()
    echo(format_diagnostics(fits))
    echo(format_fit_report(fits, choice))
    _warn_about(fits, echo)
    rescalers = {name: runtime_rescaler(res) for name, res in fits.items()}
    table = threshold_table(traces, rescalers, indicator=indicator, normalization=normalization)
    thresholds, verdict = fit_recommendation(traces, rescalers, table, options.max_error, indicator=indicator,
                                             normalization=normalization)
    doc = build_document(fits, traces, thresholds=thresholds)
    doc["recommendation"] = verdict
    title = f"{traces.model_info.get('class')} rescaler fit"
    return Fitted(doc, (lambda: plot_fit_png(fits, title=title)) if options.plot else None)


def _warn_about(fits, echo) -> None:
    """Skipped trajectories, and bootstrap bands so wide that the fit depends on which prompts were traced."""
    for name, res in fits.items():
        if res.n_skipped_trajectories:
            echo(f"skipped {res.n_skipped_trajectories} trajectories of {name} with NaN/Inf values")
        band = res.rescaler.band_
        if band is not None and band["max_rel_halfwidth"] > WIDE_BAND:
            warnings.warn(
                f"{name}: the rescaler's 95 % bootstrap band is wide (half-width {band['max_rel_halfwidth']:.0%} of"
                f" the curve at x={band['at']:.4g}, over {WIDE_BAND:.0%}) — the fit depends on which prompts were"
                " traced; trace more prompts",
                stacklevel=3,
            )


def describe(doc: dict) -> list[str]:
    if no_cache(doc):
        return [doc["recommendation"]["reason"]]
    thresholds = doc.get("thresholds") or {}
    recommended = thresholds.get("recommended")
    row = next((r for r in thresholds.get("table", []) if r["threshold"] == recommended), None)
    verdict = doc.get("recommendation") or {}
    row = row or verdict.get("chosen")  # a threshold held to the quality bar lies between the table's rows
    lines = [verdict["reason"]] if verdict.get("reason") else []
    if row is None or row.get("compute_fraction") is None:
        return lines
    return [f"recommended threshold {recommended:g}: replayed on the traces it computes {row['compute_fraction']:.0%} "
            f"of steps (predicted {row['predicted_speedup']:.2f}x fewer forwards)"] + lines


def tune(doc: dict, goal: TuneGoal, context: TuneContext) -> Tuned:
    """Replay the file's rule on the traces, print the table, choose the threshold for ``goal`` and record table
    and choice in the document's ``thresholds`` section.

    ``--costs`` (a ``calib eval`` results file): its measured cost model turns ``--speedup`` into a wall-clock goal
    (a skipped step still pays the pipeline, the embeddings, the indicator and the output head, so 2x fewer
    forwards is less than 2x faster) and adds the predicted wall-clock speed-up to the table."""
    echo, source = context.echo, context.source
    rescalers, indicator, normalization = rescalers_of(doc)
    trace_set = context.traces("teacache")
    _check_traces(doc, trace_set, rescalers, source)
    kw = dict(indicator=indicator, normalization=normalization)
    bar = (doc.get("recommendation") or {}).get("max_error")
    if bar is not None:  # the fit's quality bar, checked on these traces: no threshold where no skip keeps it
        verdict = skip_verdict(trace_set, rescalers, bar)
        if not verdict["cache"]:
            echo(f"replayed {len(trace_set.trajectories)} traced trajectories "
                 f"({', '.join(str(f) for f in trace_set.files)})")
            echo(format_table(tune_table(trace_set, rescalers, **kw)))
            echo(f"{verdict['reason']} (--{goal.option} {goal.value:g} not applied; threshold 0 computes every step)")
            doc["thresholds"] = dict(doc.get("thresholds") or {}, recommended=0.0)
            doc["recommendation"] = verdict
            return Tuned(doc, "no cache (threshold 0: every step computes)",
                         {"threshold": 0.0, "reached": False, "no_cache": True, "recommendation": verdict})
    cost_model = context.cost_model()
    search, wall_reachable = goal, True
    if cost_model is not None and goal.kind == "speedup":
        wall_reachable = predicted_wall_speedup(cost_model, 0.0) >= goal.value
        search = TuneGoal("compute_fraction", wall_target_fraction(cost_model, goal.value))
    chosen, reached = find_threshold(trace_set, rescalers, search, **kw)
    reached = reached and wall_reachable
    table = tune_table(trace_set, rescalers, extra=[chosen.threshold], **kw)
    chosen = next(r for r in table if r.threshold == chosen.threshold)
    echo(f"replayed {len(trace_set.trajectories)} traced trajectories ({', '.join(str(f) for f in trace_set.files)})")
    if cost_model is not None:
        echo(f"cost model from {context.costs}: every step computed {cost_model['ratio_all_computed']:.2f}x, fewest "
             f"({cost_model['fewest_fraction']:.1%}) computed {cost_model['ratio_fewest_computed']:.2f}x the uncached "
             "time; --speedup is wall-clock")
    echo(format_table(table, chosen, cost_model))
    wall = ""
    if cost_model is not None:
        wall = f", predicted {predicted_wall_speedup(cost_model, chosen.compute_fraction):.2f}x wall-clock"
    if reached:
        echo(f"threshold {chosen.threshold:g} for --{goal.option} {goal.value:g}: computes "
             f"{chosen.compute_fraction:.1%} of steps (predicted {chosen.predicted_speedup:.2f}x fewer forwards{wall}, "
             f"predicted error {chosen.predicted_error:.5f})")
    else:
        echo(f"--{goal.option} {goal.value:g} cannot be reached on these traces (the first and last steps always "
             f"compute{'' if wall_reachable else ', and they and the fixed costs cap the wall-clock speed-up'}); "
             f"closest: threshold {chosen.threshold:g}, {chosen.compute_fraction:.1%} computed{wall}")
    if bar is not None and chosen.predicted_error is not None and chosen.predicted_error > bar:
        echo(f"note: threshold {chosen.threshold:g} is predicted {chosen.predicted_error:.4g}, above the file's "
             f"quality bar {bar:g} (latent rel-L1; docs/calibrate-your-model.md#few-step-models)")
    if cost_model is None and goal.kind == "speedup":
        # On small models the fixed part of a step (pipeline, embeddings, indicator, head) is a sizeable share, so
        # 2x fewer forwards is less than 2x wall-clock; calib eval measures it (docs/evaluation.md).
        echo("note: this speed-up counts transformer forwards; for a wall-clock target run `calib eval --out "
             "results.json` once and pass `--costs results.json`")
    doc["thresholds"] = tuned_thresholds_section(table, chosen, goal, reached, trace_set, cost_model)
    return Tuned(doc, f"the table and threshold {chosen.threshold:g}",
                 {"threshold": chosen.threshold, "row": chosen, "reached": reached, "table": table})


def _check_traces(doc: dict, trace_set, rescalers: dict, source) -> None:
    """The traces hold the file's components; warn where their model or pipeline settings differ from the
    calibration's (the replay then predicts what the cache does on theirs)."""
    if not any(t.component in rescalers for t in trace_set.trajectories):
        have = sorted({t.component for t in trace_set.trajectories})
        raise CalibError(f"the traces hold components {have}; {source} has rescalers for {sorted(rescalers)}")
    model_class = (doc.get("model") or {}).get("class")
    traced_class = (trace_set.model_info or {}).get("class")
    if model_class and traced_class and model_class != traced_class:
        warnings.warn(f"the traces are of {traced_class}, {source} was calibrated for {model_class}", stacklevel=3)
    calibrated = (doc.get("calibration") or {}).get("pipeline")
    if calibrated is None:
        return
    for path, attrs in zip(trace_set.files, trace_set.attrs):
        traced = pipeline_settings([attrs])
        diff = None if traced is None else settings_difference(calibrated, traced,
                                                               unknown=("steps", "guidance", "record_blocks"))
        if diff is not None:
            warnings.warn(f"{path} was traced with {diff[1]}, {source} was calibrated with {diff[0]}; the replay "
                          "predicts what the cache does on the traces' settings", stacklevel=3)
