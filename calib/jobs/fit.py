"""``calib fit``: traces in, a coefficient document (and its plot) out, for each method (calib.cli calls these)."""

from __future__ import annotations

import warnings
from pathlib import Path

from calib._io import resolve_output, write_files
from calib.errors import CalibError
from calib.exports.engines import teacache_formats
from calib.methods import auto, block_cache, fastercache_cfg, registry, schedule
from calib.methods.base import TuneTarget
from calib.methods.teacache.configs import runtime_rescaler
from calib.methods.teacache.document import build_document as build_teacache_document
from calib.methods.teacache.fit import (check_settings, fit_all_components, format_diagnostics, format_fit_report,
                                        select_indicator)
from calib.methods.teacache.forecast import choose_forecast
from calib.methods.teacache.rescalers import INDICATORS, NORMALIZATIONS, WIDE_BAND
from calib.methods.teacache.tune import RECOMMENDED_COMPUTE_FRACTION, recommend, threshold_table, thresholds_section
from calib.models import loading as model_loading  # load_model is looked up at call time (tests replace it)
from calib.report.plots import plot_fit_png
from calib.runtime import Forecast
from calib.store import read_traces
from calib.store.shards import parse_shard
from calib.trace import pick_device


def _json_out(out, traces, default, what: str = "coefficient file") -> Path:
    """``--out`` (which must end in .json), else ``default(traces)``."""
    if out is not None and Path(out).suffix.lower() != ".json":
        raise CalibError(f"--out {out}: the {what} must end in .json")
    return Path(out) if out is not None else default(traces)


def _write(files: list, targets: list, echo, summary=()) -> None:
    """Write a document and its figure, one product: both are replaced, or neither (calib._io.write_files); then
    say what was fitted and written."""
    write_files(files, targets=targets)
    for line in summary:
        echo(line)
    for path, _ in files:
        echo(f"wrote {path}")


def default_coeffs_path(traces: list[Path]) -> Path:
    stem = Path(traces[0]).name.split(".")[0]
    return Path("coeffs") / f"{stem}.json"


def run_teacache_fit(traces, *, out=None, degree="auto", streams=None, plot: bool = True, echo=print,
                     robust: bool = False, indicator: str = "auto", normalization: str = "auto", bootstrap: int = 200,
                     allow_mixed: bool = False, forecast="auto", forecast_variable: str = "auto") -> Path:
    """``calib fit`` (TeaCache): traces in, validated coefficient JSON (with its threshold table) and PNG out."""
    if forecast_variable == "timestep":
        raise CalibError("--forecast-variable timestep is for --method schedule; the teacache fit picks step or sigma")
    if isinstance(degree, str) and degree != "auto":
        try:
            degree = int(degree)
        except ValueError:
            raise CalibError(f"--degree {degree!r}: expected auto or an integer from 1 to 9") from None
    out = _json_out(out, traces, default_coeffs_path)
    if indicator != "auto" and indicator not in INDICATORS:
        raise CalibError(f"--indicator {indicator!r}: choose auto or one of {', '.join(INDICATORS)}")
    if normalization != "auto" and normalization not in NORMALIZATIONS:
        raise CalibError(f"--normalization {normalization!r}: choose auto or one of {', '.join(NORMALIZATIONS)}")
    if bootstrap < 0:
        raise CalibError(f"--bootstrap must be >= 0, got {bootstrap}")
    # the outputs are checked before hours of fitting, and against the inputs (a manifest is a .json too)
    targets = [resolve_output(out, inputs=traces)]
    if plot:
        targets.append(resolve_output(out.with_suffix(".png"), inputs=traces))
    trace_set = read_traces([Path(t) for t in traces])
    check_settings(trace_set, allow_mixed)
    choice = None
    if indicator == "auto" or normalization == "auto":
        choice = select_indicator(
            trace_set, degree=degree, streams=streams, robust=robust,
            indicators=list(INDICATORS) if indicator == "auto" else [indicator],
            normalizations=list(NORMALIZATIONS) if normalization == "auto" else [normalization],
        )
        indicator, normalization = choice.indicator, choice.normalization
    # TeaCache's fit first: whatever is wrong with the traces is reported as it always was.
    fits = fit_all_components(trace_set, degree=degree, streams=streams, robust=robust, indicator=indicator,
                              normalization=normalization, bootstrap=bootstrap)
    forecast_entry = choose_forecast(trace_set, forecast, forecast_variable, degree=degree, streams=streams,
                                     robust=robust, indicator=indicator, normalization=normalization, echo=echo)
    if forecast_entry is not None:
        if (forecast_entry.get("selection") or {}).get("rescaler_target") == "forecast_error":
            fits = fit_all_components(trace_set, degree=degree, streams=streams, robust=robust, indicator=indicator,
                                      normalization=normalization, bootstrap=bootstrap, forecast=forecast_entry)
        else:  # the rescaler maps the output change: the fit above, with the forecast recorded beside it
            for res in fits.values():
                res.forecast = dict(forecast_entry)
    echo(format_diagnostics(fits))
    echo(format_fit_report(fits, choice))
    for name, res in fits.items():
        if res.n_skipped_trajectories:
            echo(f"skipped {res.n_skipped_trajectories} trajectories of {name} with NaN/Inf values")
        band = res.rescaler.band_
        if band is not None and band["max_rel_halfwidth"] > WIDE_BAND:
            warnings.warn(
                f"{name}: the rescaler's 95 % bootstrap band is wide (half-width {band['max_rel_halfwidth']:.0%} of"
                f" the curve at x={band['at']:.4g}, over {WIDE_BAND:.0%}) — the fit depends on which prompts were"
                " traced; trace more prompts",
                stacklevel=2,
            )
    rescalers = {name: runtime_rescaler(res) for name, res in fits.items()}
    table = threshold_table(trace_set, rescalers, indicator=indicator, normalization=normalization)
    chosen = recommend(table)
    doc = build_teacache_document(fits, trace_set,
                                  thresholds=thresholds_section(table, chosen, RECOMMENDED_COMPUTE_FRACTION))
    registry.validate(doc, "<built document>")
    files = [(out, registry.document_bytes(doc, out))]
    if plot:  # the JSON and its PNG are one product: both are replaced, or neither
        files.append((out.with_suffix(".png"),
                      plot_fit_png(fits, title=f"{trace_set.model_info.get('class')} rescaler fit")))
    _write(files, targets, echo, [
        f"recommended threshold {chosen.threshold:g}: replayed on the traces it computes "
        f"{chosen.compute_fraction:.0%} of steps (predicted {chosen.predicted_speedup:.2f}x fewer forwards)"])
    echo(teacache_formats(doc))  # docs/exports.md: the engines need the plain change, some degree 4
    return out


def default_block_cache_out(traces) -> Path:
    stem = Path(traces[0]).name.split(".")[0]
    return Path("coeffs") / f"{stem}.blockcache.json"


def run_block_cache_fit(traces, *, out=None, target_fraction: float = block_cache.DEFAULT_TARGET_FRACTION,
                        streams=None, plot: bool = True, echo=print) -> Path:
    """``calib fit --method block-cache``: traces in, block-cache JSON (+ heat-map PNG) out."""
    out = _json_out(out, traces, default_block_cache_out)
    png = out.with_suffix(".png")
    targets = [resolve_output(p, inputs=traces) for p in ([out, png] if plot else [out])]
    trace_set = read_traces([Path(t) for t in traces])
    doc, plots = block_cache.build_document(trace_set, target_fraction=target_fraction, streams=streams)
    registry.validate(doc, "<built document>")
    files = [(out, registry.document_bytes(doc, out))]
    if plot:  # the JSON and its heat-map: both replaced, or neither
        files.append((png, block_cache.heatmap_png(plots, title=f"{doc['model']['class']} block changes")))
    row = next(r for r in doc["thresholds"]["table"] if r["threshold"] == doc["thresholds"]["recommended"])
    summary = [f"{name}: {len(comp['blocks'])} blocks x {comp['steps']} steps; computations per block at the "
               f"recommended threshold: " + ", ".join(f"{b}: {len(s)}" for b, s in comp["schedule"].items())
               for name, comp in doc["block_cache"]["components"].items()]
    summary.append(f"recommended threshold {doc['thresholds']['recommended']:.6g}: computes "
                   f"{row['compute_fraction']:.1%} of block evaluations (target <= {target_fraction:.0%}, predicted "
                   f"{row['predicted_speedup']:.2f}x fewer)")
    _write(files, targets, echo, summary)
    return out


def default_fastercache_out(traces) -> Path:
    stem = Path(traces[0]).name.split(".")[0]
    return Path("coeffs") / f"{stem}.fastercache.json"


def run_fastercache_fit(traces, *, out=None, cfg_tolerance=None, plot: bool = True, echo=print) -> Path:
    """``calib fit --method fastercache-cfg``; it draws nothing, so ``plot`` is accepted and changes nothing."""
    out = _json_out(out, traces, default_fastercache_out)
    resolve_output(out, inputs=traces)  # before the work: a directory, one of the inputs
    trace_set = read_traces([Path(t) for t in traces])
    doc = registry.validate(fastercache_cfg.build_document(trace_set, cfg_tolerance=cfg_tolerance),
                           "<built document>")
    registry.write_document(doc, out, inputs=traces)
    for name, comp in doc["fastercache_cfg"]["components"].items():
        lo, hi = comp["unconditional_batch_timestep_skip_range"]
        echo(f"{name}: unconditional pass skipped at steps {comp['uncond_skipped_steps']} "
             f"(N = {comp['unconditional_batch_skip_range']}, {lo:.6g} < t < {hi:.6g}; reused difference at most "
             f"{comp['cfg_tolerance']:.3g} rel-L1 stale); {comp['uncond_compute_fraction']:.0%} of unconditional "
             "passes computed")
    echo(f"wrote {out}")
    return out


def default_schedule_out(traces) -> Path:
    first = Path(str(traces[0]))
    name = first.name
    for suffix in (".manifest.json", ".h5", ".hdf5"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return Path("coeffs") / f"{name}.schedule.json"


def run_schedule_fit(traces, *, out=None, gap: int | None = None, forecast_order=None, forecast_variable=None,
                     shard=None, overwrite=False, device=None, seeds=None, echo=print) -> Path | None:
    """``calib fit --method schedule``: traces in (they name the model and its settings), schedule JSON out.
    ``gap`` None: :data:`calib.methods.schedule.DEFAULT_GAP`; ``forecast_variable`` None or "auto": step."""
    out = _json_out(out, traces, default_schedule_out, "schedule file")
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    candidates = schedule.parse_candidates(forecast_order, forecast_variable)
    trace_set = read_traces([Path(t) for t in traces])
    setup = schedule.setup_from_traces(trace_set, seeds=seeds)
    pipe = model_loading.load_model(setup.source, device=pick_device(device))
    doc = schedule.fit_schedule(pipe, trace_set, out=out, gap=gap, candidates=candidates, shard=shard,
                                overwrite=overwrite, seeds=seeds, echo=echo)
    if doc is None:
        return None
    registry.write_document(doc, out)
    echo(schedule.format_schedules(doc))
    echo(f"forecast {doc['calibration']['forecast_choice']}; held-out error per candidate: "
         + ", ".join(f"{k} {v:.5f}" for k, v in doc["calibration"]["forecast_candidates"].items()))
    echo(f"wrote {out} ({len(doc['schedules'])} budgets; recommended {doc['recommended']['budget']} of "
         f"{doc['steps']} steps); segment errors kept in {schedule.segments_path(out)}")
    return out


def default_auto_out(traces) -> Path:
    """The schedule fit's default name without ".schedule": the kept candidate's file."""
    out = default_schedule_out(traces)
    return out.with_name(out.name.replace(".schedule.json", ".json"))


def run_auto_fit(traces, *, out=None, compute_fraction: float = auto.DEFAULT_FRACTION, gap=None,
                 forecast_order=None, forecast_variable=None, device=None, seeds=None, echo=print) -> Path:
    """``calib fit --method auto --compute-fraction F``: writes the better of gate + forecast and schedule +
    forecast for that budget to ``out`` and says why (:func:`calib.methods.auto.compare`)."""
    fraction = compute_fraction
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise CalibError(f"--compute-fraction must be in (0, 1) for --method auto, got {fraction!r}")
    out = _json_out(out, traces, default_auto_out)
    trace_set = read_traces([Path(t) for t in traces])
    setup = schedule.setup_from_traces(trace_set, seeds=seeds)
    pipe = model_loading.load_model(setup.source, device=pick_device(device))
    stem = out.name[: -len(".json")]
    gate_path = out.with_name(f"{stem}.gate.json")
    schedule_path = out.with_name(f"{stem}.schedule.json")

    echo(f"== 1/3 gate: TeaCache's rescaler -> {gate_path}")
    run_teacache_fit([Path(t) for t in traces], out=gate_path, plot=False, echo=echo)
    echo(f"\n== 2/3 schedule: measured segments, searched schedules -> {schedule_path}")
    schedule_doc = schedule.fit_schedule(pipe, trace_set, out=schedule_path, gap=gap,
                                         candidates=schedule.parse_candidates(forecast_order, forecast_variable),
                                         seeds=seeds, echo=echo)
    target = TuneTarget("compute_fraction", fraction)
    entry, reached = schedule.choose_budget(schedule_doc, target)
    schedule_doc["recommended"] = {"budget": entry["budget"]}
    registry.write_document(schedule_doc, schedule_path)
    forecast = Forecast.from_json(schedule_doc["forecast"])
    echo(f"\n== 3/3 compare on {len(setup.holdout_prompts)} held-out prompt(s) x seeds {setup.seeds} at <= "
         f"{fraction:.0%} of full forwards, forecast {forecast.as_json()}")
    gate_doc = registry.load_document(gate_path)
    verdict = auto.compare(pipe, setup, gate_doc, schedule_doc, entry, reached, forecast, fraction, trace_set,
                           echo=echo)
    forecast = Forecast.from_json(verdict["gate"]["forecast"])
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
    registry.write_document(doc, out)
    echo(why)
    echo(f"wrote {out} (the {'schedule' if pick_schedule else 'coefficient'} file; both candidates kept beside it)")
    return out


# ``calib fit --method NAME``: the fit job of each registry method ``calib fit`` runs, called with that method's
# options (its registry entry's, as keywords: calib.cli.fit).
FIT_JOBS = {"teacache": run_teacache_fit, block_cache.METHOD: run_block_cache_fit,
            fastercache_cfg.METHOD: run_fastercache_fit, schedule.METHOD: run_schedule_fit,
            auto.ENTRY.name: run_auto_fit}


def run_fit(method: str, traces, **options):
    """Fit ``method`` (a registry name; one-line CalibError for another) on ``traces`` with its own options."""
    return FIT_JOBS[registry.get(method).name](traces, **options)
