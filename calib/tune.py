"""Replay the runtime's decision rule on traces: which threshold skips how much.

The replay runs :func:`calib.runtime.gate.replay`, the runtime's own gate, on each traced stream's indicator
changes, so the predicted fraction of full forwards is what the runtime will do on those trajectories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .runtime.gate import Rescaler, replay

DEFAULT_GRID = tuple(np.round(np.concatenate([np.arange(0.01, 0.1, 0.01), np.arange(0.1, 1.01, 0.05)]), 4))
# Recommend the smallest threshold that computes at most this fraction of steps (~1.6x fewer forwards):
# the paper's "slow" FLUX setting sits there, and on the built-in models the output error stays small.
RECOMMENDED_COMPUTE_FRACTION = 0.6


@dataclass
class ThresholdRow:
    threshold: float
    compute_fraction: float
    predicted_error: float | None = None  # see error_proxy(); None where it was not computed

    @property
    def predicted_speedup(self) -> float:
        return 1.0 / self.compute_fraction if self.compute_fraction > 0 else float("inf")

    def as_dict(self) -> dict:
        out = {
            "threshold": float(self.threshold),
            "compute_fraction": round(float(self.compute_fraction), 6),
            "predicted_speedup": round(float(self.predicted_speedup), 4),
        }
        if self.predicted_error is not None:
            out["predicted_error"] = round(float(self.predicted_error), 6)
        return out


def compute_fraction(trace_set, rescalers: dict[str, Rescaler], threshold: float, *,
                     indicator: str = "modulated_input", normalization: str = "none") -> float:
    """Fraction of steps that compute, over every traced trajectory of the components that have a rescaler.

    ``indicator`` and ``normalization`` say which traced series the rescalers take (as recorded in the coefficient
    file's ``indicator`` section), so the replay sees what the runtime will compute."""
    computed = total = 0
    for _traj, decisions in replay_trajectories(trace_set, rescalers, threshold, indicator=indicator,
                                                normalization=normalization):
        computed += sum(decisions)
        total += len(decisions)
    if total == 0:
        raise ValueError("no trajectories to replay")
    return computed / total


def replay_trajectories(trace_set, rescalers: dict[str, Rescaler], threshold: float, *,
                        indicator: str = "modulated_input", normalization: str = "none"):
    """``(trajectory, decisions)`` for every traced trajectory of a component with a rescaler: the runtime's own
    gate (:func:`calib.runtime.gate.replay`) run on the trajectory's indicator changes (True = computed)."""
    from .fit import forced_last_mask
    from .rescalers import indicator_series

    for traj in trace_set.trajectories:
        rescaler = rescalers.get(traj.component)
        if rescaler is None:
            continue
        series = indicator_series(traj, indicator, normalization)
        if series is None:
            continue
        changes, _, scales = series
        last_forced = bool(forced_last_mask(traj, len(changes))[-1])
        yield traj, replay(changes.tolist(), rescaler, threshold, None if normalization == "none" else scales.tolist(),
                           last_forced=last_forced)


def threshold_table(trace_set, rescalers: dict[str, Rescaler], grid=DEFAULT_GRID, *,
                    indicator: str = "modulated_input", normalization: str = "none") -> list[ThresholdRow]:
    return [
        ThresholdRow(float(t), compute_fraction(trace_set, rescalers, float(t), indicator=indicator,
                                                normalization=normalization))
        for t in grid
    ]


def recommend(table: list[ThresholdRow], target_fraction: float = RECOMMENDED_COMPUTE_FRACTION) -> ThresholdRow:
    """The smallest threshold whose replayed compute fraction is at most ``target_fraction`` (else the largest)."""
    for row in sorted(table, key=lambda r: r.threshold):
        if row.compute_fraction <= target_fraction:
            return row
    return max(table, key=lambda r: r.threshold)


def thresholds_section(table: list[ThresholdRow], chosen: ThresholdRow, target_fraction: float) -> dict:
    return {
        "recommended": float(chosen.threshold),
        "criterion": f"smallest threshold with replayed compute fraction <= {target_fraction}",
        "table": [row.as_dict() for row in table],
    }


# ---------------------------------------------------------------------------------------------------------------
# calib tune: a threshold for a target (speed-up, compute fraction or error budget), chosen on the replay
# ---------------------------------------------------------------------------------------------------------------
ERROR_PROXY = (
    "mean over traced trajectories of sum over replayed skipped steps i of dsigma_i * staleness_i, where "
    "staleness_i = sum of the traced output_rel_l1 over the steps since the last computed step (up to and "
    "including i) and dsigma_i = sigma_i - sigma_(i+1) is the weight the sampler gives step i's output "
    "(1/steps when the traces have no sigmas)"
)
TARGET_KINDS = ("speedup", "compute_fraction", "max_error")
_BISECTION_STEPS = 60


@dataclass(frozen=True)
class TuneTarget:
    """What ``calib tune`` aims for: ``speedup`` (fewer forwards, >= 1), ``compute_fraction`` (0 < F <= 1) or
    ``max_error`` (an upper bound on :data:`ERROR_PROXY`, >= 0)."""

    kind: str
    value: float

    def __post_init__(self):
        import math

        from .errors import CalibError

        if self.kind not in TARGET_KINDS:
            raise CalibError(f"unknown target {self.kind!r}; choose one of {', '.join(TARGET_KINDS)}")
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            raise CalibError(f"--{self.option}: expected a number, got {self.value!r}") from None
        if not math.isfinite(value):
            raise CalibError(f"--{self.option} must be a finite number, got {self.value}")
        if self.kind == "speedup" and value < 1.0:
            raise CalibError(f"--speedup must be >= 1 (a speed-up in forwards; 2 computes half the steps), got {value:g}")
        if self.kind == "compute_fraction" and not 0.0 < value <= 1.0:
            raise CalibError(f"--compute-fraction must be in (0, 1] (the fraction of steps that compute), got {value:g}")
        if self.kind == "max_error" and value < 0.0:
            raise CalibError(f"--max-error must be >= 0 (a bound on the predicted error proxy), got {value:g}")
        object.__setattr__(self, "value", value)

    @property
    def option(self) -> str:
        return self.kind.replace("_", "-")

    @property
    def fraction(self) -> float | None:
        """The compute fraction the target asks for (None for an error budget)."""
        if self.kind == "speedup":
            return 1.0 / self.value
        if self.kind == "compute_fraction":
            return self.value
        return None

    def describe(self) -> str:
        if self.kind == "speedup":
            return f"smallest threshold with replayed compute fraction <= 1/{self.value:g} (speed-up >= {self.value:g}x in forwards)"
        if self.kind == "compute_fraction":
            return f"smallest threshold with replayed compute fraction <= {self.value:g}"
        return f"largest threshold with predicted error <= {self.value:g} (the fewest forwards within the error budget)"


def _step_weights(traj) -> np.ndarray:
    """dsigma_i = sigma_i - sigma_(i+1): how much of step i's model output enters the final latent (Euler/flow
    samplers); uniform 1/n where the sigmas are unknown or not decreasing."""
    n = len(traj.step_index)
    sigmas = np.asarray(getattr(traj, "sigmas", np.full(n, np.nan)), dtype=np.float64).reshape(-1)
    w = np.full(n, 1.0 / n)
    if n > 1 and np.all(np.isfinite(sigmas)):
        d = sigmas[:-1] - sigmas[1:]
        if np.all(d > 0):
            w[:-1] = d  # the last step always computes: its weight never enters the proxy
    return w


def trajectory_error(decisions, output_changes, weights) -> float:
    """The error proxy of one replayed trajectory (see :data:`ERROR_PROXY`): a skipped step reuses the output of the
    last computed step, which is stale by the output changes since then (their sum bounds the relative change);
    the sampler adds that output with weight dsigma_i."""
    stale = err = 0.0
    for i, computed in enumerate(decisions):
        if computed:
            stale = 0.0
            continue
        y = float(output_changes[i])
        stale += y if math.isfinite(y) else 0.0
        err += float(weights[i]) * stale
    return err


def replay_row(trace_set, rescalers: dict[str, Rescaler], threshold: float, *, indicator: str = "modulated_input",
               normalization: str = "none") -> ThresholdRow:
    """Replayed compute fraction and error proxy at one threshold."""
    computed = total = 0
    errors = []
    for traj, decisions in replay_trajectories(trace_set, rescalers, threshold, indicator=indicator,
                                               normalization=normalization):
        computed += sum(decisions)
        total += len(decisions)
        errors.append(trajectory_error(decisions, traj.output_rel_l1, _step_weights(traj)))
    if total == 0:
        raise ValueError("no trajectories to replay")
    return ThresholdRow(float(threshold), computed / total, float(np.mean(errors)))


def max_useful_threshold(trace_set, rescalers: dict[str, Rescaler], *, indicator: str = "modulated_input",
                         normalization: str = "none") -> float:
    """A threshold above every trajectory's whole accumulated rescaled change: from there on only the first and the
    last steps compute, and a larger threshold changes nothing."""
    from .rescalers import indicator_series

    top = 0.0
    for traj in trace_set.trajectories:
        rescaler = rescalers.get(traj.component)
        series = None if rescaler is None else indicator_series(traj, indicator, normalization)
        if series is None:
            continue
        changes, _, scales = series
        total = 0.0
        for i in range(1, len(changes)):
            x, s = float(changes[i]), float(scales[i])
            if not (math.isfinite(x) and math.isfinite(s) and s > 0):
                continue
            total += s * rescaler(x / s) if normalization != "none" else rescaler(x)
        top = max(top, total)
    return top * 1.01 + 1e-9


def _round_sig(value: float, up: bool, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits, rounded up or down (so a threshold that meets a target still
    meets it after rounding, the fraction and the error proxy being monotone in the threshold)."""
    if value <= 0:
        return 0.0
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return (math.ceil(value * scale - 1e-9) if up else math.floor(value * scale + 1e-9)) / scale


def find_threshold(trace_set, rescalers: dict[str, Rescaler], target: TuneTarget, *,
                   indicator: str = "modulated_input", normalization: str = "none") -> tuple[ThresholdRow, bool]:
    """``(row, reached)``: the threshold for ``target`` by bisection over the replay. Fraction targets take the
    smallest threshold whose replayed compute fraction is <= the target (the least skipping that reaches it);
    ``max_error`` takes the largest threshold whose error proxy is <= the budget. When the target cannot be reached
    the row is the closest the rule gets and ``reached`` is False."""
    kw = dict(indicator=indicator, normalization=normalization)

    def row(t):
        return replay_row(trace_set, rescalers, t, **kw)

    top = max_useful_threshold(trace_set, rescalers, **kw)
    want = target.fraction
    if want is not None:
        def ok(r):
            return r.compute_fraction <= want + 1e-12
        if ok(row(0.0)):
            return row(0.0), True
        hi_row = row(top)
        if not ok(hi_row):
            return hi_row, False
        lo, hi = 0.0, top
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            if ok(row(mid)):
                hi = mid
            else:
                lo = mid
        chosen = row(_round_sig(hi, up=True))
        return (chosen, True) if ok(chosen) else (row(hi), True)
    budget = target.value
    top_row = row(top)
    if top_row.predicted_error <= budget:
        return top_row, True
    lo, hi = 0.0, top
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if row(mid).predicted_error <= budget:
            lo = mid
        else:
            hi = mid
    chosen = row(_round_sig(lo, up=False))
    return (chosen, True) if chosen.predicted_error <= budget else (row(lo), True)


def tune_table(trace_set, rescalers: dict[str, Rescaler], *, extra=(), grid=DEFAULT_GRID,
               indicator: str = "modulated_input", normalization: str = "none") -> list[ThresholdRow]:
    """Rows of the grid (cut after the first threshold at which only the first and last steps compute) and of
    ``extra`` thresholds, with fraction and error proxy, sorted by threshold."""
    kw = dict(indicator=indicator, normalization=normalization)
    top = max_useful_threshold(trace_set, rescalers, **kw)
    thresholds = sorted({float(t) for t in grid if t <= top} | {float(t) for t in extra} | {0.0})
    rows = [replay_row(trace_set, rescalers, t, **kw) for t in thresholds]
    floor = min(r.compute_fraction for r in rows)
    cut = next((i for i, r in enumerate(rows) if r.compute_fraction <= floor), len(rows) - 1)
    keep = {float(t) for t in extra}
    return [r for i, r in enumerate(rows) if i <= cut or r.threshold in keep]


def rescalers_of(doc: dict) -> tuple[dict[str, Rescaler], str, str]:
    """``(rescalers, indicator, normalization)`` of a TeaCache coefficient document, as the runtime reads them."""
    from .errors import CalibError
    from .rescalers import INDICATORS

    if doc.get("method", "teacache") != "teacache":
        raise CalibError(f"calib tune replays TeaCache's rule; this file's method is {doc.get('method')!r}")
    rescalers = {}
    for name, comp in doc["components"].items():
        domain = comp.get("domain")
        rescalers[name] = Rescaler([float(c) for c in comp["coefficients"]],
                                   None if domain is None else (float(domain[0]), float(domain[1])))
    indicator_doc = doc.get("indicator") or {}
    indicator = indicator_doc.get("name", "modulated_input")
    if indicator not in INDICATORS:  # a custom modulation layer: the traces hold its change as input_rel_l1
        indicator = "modulated_input"
    return rescalers, indicator, str(indicator_doc.get("normalization") or "none")


def tuned_thresholds_section(table: list[ThresholdRow], chosen: ThresholdRow, target: TuneTarget, reached: bool,
                             trace_set, cost_model: dict | None = None) -> dict:
    """The coefficient file's ``thresholds`` section as ``calib tune --write`` records it."""
    describe = target.describe()
    rows = [row.as_dict() for row in table]
    if cost_model is not None:
        from .evaluation import predicted_wall_speedup

        for out, row in zip(rows, table):
            out["predicted_wall_speedup"] = round(predicted_wall_speedup(cost_model, row.compute_fraction), 4)
        if target.kind == "speedup":
            describe = (f"smallest threshold whose predicted wall-clock speed-up (cost model measured by calib eval) "
                        f"is >= {target.value:g}x")
    section = {
        "recommended": float(chosen.threshold),
        "criterion": f"calib tune --{target.option} {target.value:g}: {describe}"
                     + ("" if reached else " — not reachable; closest threshold"),
        "target": {"kind": target.kind, "value": float(target.value), "reached": bool(reached)},
        "error_proxy": ERROR_PROXY,
        "trace_files": [str(f) for f in (getattr(trace_set, "files", None) or [])],
        "num_trajectories": len(trace_set.trajectories),
        "table": rows,
    }
    if cost_model is not None:
        section["cost_model"] = {k: cost_model[k] for k in ("description", "jobs", "ratio_all_computed",
                                                            "ratio_fewest_computed", "fewest_fraction")
                                 if k in cost_model}
    return section


def format_table(table: list[ThresholdRow], chosen: ThresholdRow | None = None, costs: dict | None = None) -> str:
    """The replay table; ``speed-up`` is in forwards (1 / computed); with ``costs`` (the cost model of a
    ``calib eval`` results file) a ``wall x`` column adds the wall-clock speed-up that model predicts."""
    from .evaluation import predicted_wall_speedup

    head = f"{'threshold':>10}  {'computed':>8}  {'speed-up':>8}"
    head += f"  {'wall x':>6}" if costs else ""
    lines = [head + f"  {'pred. error':>11}"]
    for r in table:
        mark = "  <- chosen" if chosen is not None and r.threshold == chosen.threshold else ""
        speed = "inf" if r.compute_fraction <= 0 else f"{r.predicted_speedup:.2f}x"
        err = "-" if r.predicted_error is None else f"{r.predicted_error:.5f}"
        wall = f"  {predicted_wall_speedup(costs, r.compute_fraction):>5.2f}x" if costs else ""
        lines.append(f"{r.threshold:>10.5g}  {r.compute_fraction:>8.1%}  {speed:>8}{wall}  {err:>11}{mark}")
    return "\n".join(lines)


def read_cost_model(path) -> dict:
    """The ``cost_model`` of a ``calib eval --out`` results file (:func:`calib.evaluation.cost_model`)."""
    import json
    from pathlib import Path

    from .errors import CalibError

    from ._io import load_json_file

    if not Path(path).exists():
        raise CalibError(f"--costs {path}: no such file")
    try:
        doc = load_json_file(path, what="a calib eval results file")
    except CalibError as exc:
        raise CalibError(f"--costs {exc}") from None
    costs = doc.get("cost_model") if isinstance(doc, dict) else None
    keys = ("fewest_fraction", "ratio_fewest_computed", "ratio_all_computed")
    if (not isinstance(costs, dict) or doc.get("format") != "calib.eval"
            or not all(isinstance(costs.get(k), (int, float)) and math.isfinite(costs[k]) for k in keys)
            or not 0 <= costs["fewest_fraction"] < 1 or not 0 < costs["ratio_fewest_computed"] < costs["ratio_all_computed"]):
        raise CalibError(f"--costs {path}: not a calib eval results file with a usable cost_model "
                         "(write one with calib eval --out results.json)")
    return costs


def wall_target_fraction(costs: dict, speedup: float) -> float:
    """The compute fraction at which the cost model predicts a wall-clock ``speedup`` (clamped to
    [fewest_fraction, 1]: below it the forced steps compute anyway)."""
    f0, r0, r1 = costs["fewest_fraction"], costs["ratio_fewest_computed"], costs["ratio_all_computed"]
    fraction = f0 + (1.0 / speedup - r0) * (1.0 - f0) / (r1 - r0)
    return min(max(fraction, f0), 1.0)


def _show_pipeline(doc: dict, coeffs, echo) -> None:
    """Say how the calibration's pipeline was called and loaded (``calibration.pipeline``)."""
    from .method_docs import describe_pipeline

    echo(f"{coeffs} was calibrated with {describe_pipeline((doc.get('calibration') or {}).get('pipeline'))}")


def _check_traces_pipeline(doc: dict, trace_set, coeffs) -> None:
    """Warn when the traces to replay were made with other pipeline settings than the calibration's: the replay
    then predicts what the cache does on theirs."""
    from types import SimpleNamespace

    from .method_docs import pipeline_section
    from .store import settings_difference

    calibrated = (doc.get("calibration") or {}).get("pipeline")
    if calibrated is None:
        return
    for path, attrs in zip(trace_set.files, trace_set.attrs):
        traced = pipeline_section(SimpleNamespace(attrs=[attrs]))
        diff = None if traced is None else settings_difference(calibrated, traced,
                                                               unknown=("steps", "guidance", "record_blocks"))
        if diff is not None:
            import warnings

            warnings.warn(f"{path} was traced with {diff[1]}, {coeffs} was calibrated with {diff[0]}; the replay "
                          "predicts what the cache does on the traces' settings", stacklevel=2)


def run_tune(traces, coeffs, target: TuneTarget, *, write: bool = False, costs=None, echo=print) -> dict:
    """``calib tune``: replay the coefficient file's rule on the traces, print the table, choose the threshold for
    ``target`` and, with ``write``, record table and choice in the file's ``thresholds`` section.

    ``costs``: a ``calib eval`` results file; its measured cost model turns ``--speedup`` into a wall-clock target
    (a skipped step still pays the pipeline, the embeddings, the indicator and the output head, so 2x fewer forwards
    is less than 2x faster) and adds the predicted wall-clock speed-up to the table."""
    from pathlib import Path

    from .export import load_document, write_document
    from .store import read_traces

    doc = load_document(coeffs)
    _show_pipeline(doc, coeffs, echo)
    if doc.get("method") == "schedule":  # static schedules per budget: pick the budget (calib.schedule)
        from .schedule import run_tune as run_schedule_tune

        return run_schedule_tune(coeffs, doc, target, write=write, costs=costs, echo=echo)
    if not traces:
        from .errors import CalibError

        raise CalibError(f"calib tune replays {doc.get('method', 'teacache')}'s rule on traces: pass the trace files "
                         "(calib tune TRACES... --coeffs ...)")
    if doc.get("method") == "block-cache":  # a per-block schedule: its own rule (calib.block_cache)
        from .block_cache import run_tune as run_block_cache_tune
        from .errors import CalibError

        if costs is not None:
            raise CalibError("--costs is TeaCache's wall-clock cost model; a block-cache file is tuned on its "
                             "fraction of block computations")
        return run_block_cache_tune(traces, coeffs, doc, target, write=write, echo=echo)
    rescalers, indicator, normalization = rescalers_of(doc)
    trace_set = read_traces([Path(t) for t in traces])
    _check_traces_pipeline(doc, trace_set, coeffs)
    if not any(t.component in rescalers for t in trace_set.trajectories):
        from .errors import CalibError

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
        from .evaluation import predicted_wall_speedup

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
        from .evaluation import predicted_wall_speedup

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
        write_document(doc, coeffs)
        echo(f"wrote the table and threshold {chosen.threshold:g} (now the recommended one) to {coeffs}")
    return {"threshold": chosen.threshold, "row": chosen, "reached": reached, "table": table}
