"""``calib tune``: a coefficient document and its traces in, the threshold or budget for a target out (and written
with ``--write``), for each method."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calib.coeffs.document import describe_pipeline
from calib.errors import CalibError
from calib.methods import block_cache, registry, schedule
from calib.methods.base import TuneTarget
from calib.methods.cost_model import predicted_wall_speedup, read_cost_model, wall_target_fraction
from calib.methods.teacache.tune import find_threshold, format_table, rescalers_of, tune_table, tuned_thresholds_section
from calib.store import pipeline_settings, read_traces, settings_difference


def run_block_cache_tune(traces, coeffs, doc: dict, target, *, write: bool = False, echo=print) -> dict:
    """``calib tune`` on a block-cache file: the threshold whose schedule computes at most the target fraction of
    block evaluations. The schedule is fixed by the file's ``changes`` (what the runtime uses), so that is what is
    replayed; the traces are checked to be of the same model and block list."""
    if target.fraction is None:
        raise CalibError("a block-cache schedule is tuned for --speedup or --compute-fraction (block evaluations); "
                         "--max-error is defined for TeaCache's rule")
    section = doc["block_cache"]["components"]
    changes = {n: np.asarray([[np.nan if v is None else v for v in r] for r in c["changes"]], dtype=np.float64)
               for n, c in section.items()}
    trace_set = read_traces([Path(t) for t in traces])
    for name, comp in section.items():
        names = next((t.block_names for t in trace_set.trajectories if t.component == name and t.block_names), None)
        if names is not None and list(names) != list(comp["blocks"]):
            raise CalibError(f"{coeffs}: component {name!r} lists other blocks than the traces")
    chosen, rows = block_cache.tune(changes, target.fraction)
    echo(f"{'threshold':>10}  {'block evaluations computed':>26}  {'speed-up':>8}")
    for r in rows:
        mark = "  <- chosen" if r is chosen else ""
        echo(f"{r.threshold:>10.5g}  {r.compute_fraction:>26.1%}  {r.predicted_speedup:>7.2f}x{mark}")
    reached = chosen.compute_fraction <= target.fraction
    echo(f"threshold {chosen.threshold:.6g} for --{target.option} {target.value:g}: computes "
         f"{chosen.compute_fraction:.1%} of block evaluations" + ("" if reached else " (closest; target not reachable)"))
    if write:
        doc["thresholds"] = {
            "recommended": float(chosen.threshold),
            "criterion": f"calib tune --{target.option} {target.value:g}: smallest threshold whose fraction of block "
                         f"computations is <= {target.fraction:g}",
            "table": [r.as_dict() for r in rows],
        }
        doc["block_cache"]["schedule_threshold"] = float(chosen.threshold)
        for name, comp in section.items():
            sched = block_cache.schedule(changes[name], chosen.threshold)
            comp["schedule"] = {b: [int(s) for s in np.flatnonzero(sched[:, j])] for j, b in enumerate(comp["blocks"])}
        registry.write_document(doc, coeffs)
        echo(f"wrote the table and threshold {chosen.threshold:.6g} (now the recommended one) to {coeffs}")
    return {"threshold": chosen.threshold, "row": chosen, "reached": reached, "table": rows}


def run_schedule_tune(coeffs, doc: dict, target, *, write: bool = False, costs=None, echo=print) -> dict:
    """``calib tune --coeffs SCHEDULE.json``: the budget for the target; ``--write`` makes it the recommended one."""
    cost_model = None
    if costs is not None:
        cost_model = read_cost_model(costs)
    entry, reached = schedule.choose_budget(doc, target, cost_model)
    n = doc["steps"]
    shown = dict(doc, recommended={"budget": entry["budget"]})
    echo(schedule.format_schedules(shown).replace("<- recommended", "<- chosen"))
    wall = ""
    if cost_model is not None:
        wall = f", predicted {predicted_wall_speedup(cost_model, entry['budget'] / n):.2f}x wall-clock"
    err = (entry.get("error") or {}).get("holdout_latent_rel_l1")
    what = f"budget {entry['budget']} of {n} steps ({entry['budget'] / n:.1%}, {n / entry['budget']:.2f}x fewer " \
           f"forwards{wall}, held-out error {err if err is None else f'{err:.5f}'})"
    if reached:
        echo(f"--{target.option} {target.value:g}: {what}")
    else:
        echo(f"--{target.option} {target.value:g} cannot be reached by this file's schedules; closest: {what}")
    if cost_model is None and target.option == "speedup":
        echo("note: this speed-up counts transformer forwards; for a wall-clock target run `calib eval --out "
             "results.json` once and pass `--costs results.json`")
    if write:
        doc["recommended"] = {"budget": entry["budget"]}
        registry.write_document(doc, coeffs)
        echo(f"wrote budget {entry['budget']} (now the recommended one) to {coeffs}")
    return {"budget": entry["budget"], "reached": reached, "entry": entry}


def _show_pipeline(doc: dict, coeffs, echo) -> None:
    """Say how the calibration's pipeline was called and loaded (``calibration.pipeline``)."""
    echo(f"{coeffs} was calibrated with {describe_pipeline((doc.get('calibration') or {}).get('pipeline'))}")


def _check_traces_pipeline(doc: dict, trace_set, coeffs) -> None:
    """Warn when the traces to replay were made with other pipeline settings than the calibration's: the replay
    then predicts what the cache does on theirs."""
    calibrated = (doc.get("calibration") or {}).get("pipeline")
    if calibrated is None:
        return
    for path, attrs in zip(trace_set.files, trace_set.attrs):
        traced = pipeline_settings([attrs])
        diff = None if traced is None else settings_difference(calibrated, traced,
                                                               unknown=("steps", "guidance", "record_blocks"))
        if diff is not None:
            import warnings

            warnings.warn(f"{path} was traced with {diff[1]}, {coeffs} was calibrated with {diff[0]}; the replay "
                          "predicts what the cache does on the traces' settings", stacklevel=2)


def run_tune(traces, coeffs, target: TuneTarget, *, write: bool = False, costs=None, echo=print) -> dict:
    """``calib tune``: the method's tune of a coefficient file (:data:`TUNE_JOBS`, TeaCache's replay otherwise)."""
    doc = registry.load_document(coeffs)
    _show_pipeline(doc, coeffs, echo)
    job = TUNE_JOBS.get(registry.get(doc.get("method", "teacache")).name, run_teacache_tune)
    return job(traces, coeffs, doc, target, write=write, costs=costs, echo=echo)


def _need_traces(traces, doc: dict) -> None:
    if not traces:
        raise CalibError(f"calib tune replays {doc.get('method', 'teacache')}'s rule on traces: pass the trace files "
                         "(calib tune TRACES... --coeffs ...)")


def run_teacache_tune(traces, coeffs, doc: dict, target: TuneTarget, *, write: bool = False, costs=None,
                      echo=print) -> dict:
    """``calib tune`` on a TeaCache file: replay the coefficient file's rule on the traces, print the table, choose the threshold for
    ``target`` and, with ``write``, record table and choice in the file's ``thresholds`` section.

    ``costs``: a ``calib eval`` results file; its measured cost model turns ``--speedup`` into a wall-clock target
    (a skipped step still pays the pipeline, the embeddings, the indicator and the output head, so 2x fewer forwards
    is less than 2x faster) and adds the predicted wall-clock speed-up to the table."""
    _need_traces(traces, doc)
    rescalers, indicator, normalization = rescalers_of(doc)
    trace_set = read_traces([Path(t) for t in traces])
    _check_traces_pipeline(doc, trace_set, coeffs)
    if not any(t.component in rescalers for t in trace_set.trajectories):
        have = sorted({t.component for t in trace_set.trajectories})
        raise CalibError(f"the traces hold components {have}; {coeffs} has rescalers for {sorted(rescalers)}")
    model_class = (doc.get("model") or {}).get("class")
    traced_class = (trace_set.model_info or {}).get("class")
    if model_class and traced_class and model_class != traced_class:
        import warnings

        warnings.warn(f"the traces are of {traced_class}, {coeffs} was calibrated for {model_class}", stacklevel=2)
    kw = dict(indicator=indicator, normalization=normalization)
    cost_model = None if costs is None else read_cost_model(costs)
    search = target
    wall_reachable = True
    if cost_model is not None and target.kind == "speedup":
        wall_reachable = predicted_wall_speedup(cost_model, 0.0) >= target.value
        search = TuneTarget("compute_fraction", wall_target_fraction(cost_model, target.value))
    chosen, reached = find_threshold(trace_set, rescalers, search, **kw)
    reached = reached and wall_reachable
    table = tune_table(trace_set, rescalers, extra=[chosen.threshold], **kw)
    chosen = next(r for r in table if r.threshold == chosen.threshold)
    echo(f"replayed {len(trace_set.trajectories)} traced trajectories ({', '.join(str(f) for f in trace_set.files)})")
    if cost_model is not None:
        echo(f"cost model from {costs}: every step computed {cost_model['ratio_all_computed']:.2f}x, fewest "
             f"({cost_model['fewest_fraction']:.1%}) computed {cost_model['ratio_fewest_computed']:.2f}x the uncached "
             "time; --speedup is wall-clock")
    echo(format_table(table, chosen, cost_model))
    wall = ""
    if cost_model is not None:
        wall = f", predicted {predicted_wall_speedup(cost_model, chosen.compute_fraction):.2f}x wall-clock"
    if reached:
        echo(f"threshold {chosen.threshold:g} for --{target.option} {target.value:g}: computes "
             f"{chosen.compute_fraction:.1%} of steps (predicted {chosen.predicted_speedup:.2f}x fewer forwards{wall}, "
             f"predicted error {chosen.predicted_error:.5f})")
    else:
        echo(f"--{target.option} {target.value:g} cannot be reached on these traces (the first and last steps always "
             f"compute{'' if wall_reachable else ', and they and the fixed costs cap the wall-clock speed-up'}); "
             f"closest: threshold {chosen.threshold:g}, {chosen.compute_fraction:.1%} computed{wall}")
    if cost_model is None and target.option == "speedup":
        # On small models the fixed part of a step (pipeline, embeddings, indicator, head) is a sizeable share, so
        # 2x fewer forwards is less than 2x wall-clock; calib eval measures it (docs/evaluation.md).
        echo("note: this speed-up counts transformer forwards; for a wall-clock target run `calib eval --out "
             "results.json` once and pass `--costs results.json`")
    if write:
        doc["thresholds"] = tuned_thresholds_section(table, chosen, target, reached, trace_set, cost_model)
        registry.write_document(doc, coeffs)
        echo(f"wrote the table and threshold {chosen.threshold:g} (now the recommended one) to {coeffs}")
    return {"threshold": chosen.threshold, "row": chosen, "reached": reached, "table": table}


def _tune_block_cache(traces, coeffs, doc: dict, target, *, write: bool, costs, echo) -> dict:
    _need_traces(traces, doc)
    if costs is not None:
        raise CalibError("--costs is TeaCache's wall-clock cost model; a block-cache file is tuned on its "
                         "fraction of block computations")
    return run_block_cache_tune(traces, coeffs, doc, target, write=write, echo=echo)


def _tune_schedule(traces, coeffs, doc: dict, target, *, write: bool, costs, echo) -> dict:
    # Static schedules per budget: the file alone picks the budget, no traces needed.
    return run_schedule_tune(coeffs, doc, target, write=write, costs=costs, echo=echo)


# The tune job of each registry method that is not TeaCache's replay (a fastercache-cfg file reaches the replay,
# which says it is not TeaCache's rule).
TUNE_JOBS = {block_cache.METHOD: _tune_block_cache, schedule.METHOD: _tune_schedule}

