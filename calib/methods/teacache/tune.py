"""Replay the runtime's decision rule on traces: which threshold skips how much.

The replay runs :func:`calib.runtime.gate.replay`, the runtime's own gate, on each traced stream's indicator
changes, so the predicted fraction of full forwards is what the runtime will do on those trajectories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from calib.errors import CalibError
from calib.methods.base import TuneGoal
from calib.methods.cost_model import predicted_wall_speedup
from calib.methods.quality import recommendation
from calib.methods.search import bisect, first_row
from calib.methods.teacache.fit import forced_last_mask
from calib.methods.teacache.rescalers import INDICATORS, indicator_series
from calib.runtime.gate import Rescaler, replay

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
    return first_row(sorted(table, key=lambda r: r.threshold), lambda row: row.compute_fraction <= target_fraction,
                     lambda: max(table, key=lambda r: r.threshold))


def thresholds_section(table: list[ThresholdRow], chosen: ThresholdRow, target_fraction: float) -> dict:
    return {
        "recommended": float(chosen.threshold),
        "criterion": f"smallest threshold with replayed compute fraction <= {target_fraction}",
        "table": [row.as_dict() for row in table],
    }


def fit_recommendation(trace_set, rescalers: dict[str, Rescaler], table: list[ThresholdRow], max_error: float, *,
                       indicator: str = "modulated_input", normalization: str = "none") -> tuple[dict, dict]:
    """``(thresholds section, recommendation section)`` of a fit: the smallest threshold computing at most
    :data:`RECOMMENDED_COMPUTE_FRACTION` of the steps (:func:`recommend`), held to the quality bar ``max_error``
    (:mod:`calib.methods.quality`): where its predicted error is over the bar, the largest threshold within it;
    where even the cheapest skip is over the bar (a few-step model), threshold 0 (every step computes) and the
    recommendation says no cache."""
    kw = dict(indicator=indicator, normalization=normalization)
    verdict = skip_verdict(trace_set, rescalers, max_error)
    chosen, criterion = None, f"smallest threshold with replayed compute fraction <= {RECOMMENDED_COMPUTE_FRACTION}"
    if verdict["cache"]:
        chosen = replay_row(trace_set, rescalers, recommend(table).threshold, **kw)
        if chosen.predicted_error > max_error:
            within = find_threshold(trace_set, rescalers, TuneGoal("max_error", max_error), **kw)[0]
            criterion = (f"largest threshold with predicted error <= the quality bar {max_error:g} (the smallest with "
                         f"replayed compute fraction <= {RECOMMENDED_COMPUTE_FRACTION}, {chosen.threshold:g}, is "
                         f"predicted {chosen.predicted_error:.4g})")
            chosen = within
        if chosen.compute_fraction >= 1.0:  # the bar leaves nothing to skip on these traces
            verdict = recommendation(cache=False, max_error=max_error, steps=verdict["steps"],
                                     cheapest=verdict.get("cheapest_skip"), basis="predicted", scope=GATE_SCOPE)
    # The recommended threshold is always a row of the table (what calib check, tune and report read its replayed
    # fraction from): threshold 0 for no cache, the one held to the bar where it lies between the grid's rows.
    if not verdict["cache"]:
        every_step = replay_row(trace_set, rescalers, 0.0, **kw)
        return {"recommended": 0.0,
                "criterion": f"no cache: {verdict['reason']}; threshold 0 computes every step",
                "table": _with_row(table, every_step)}, verdict
    verdict = skip_verdict(trace_set, rescalers, max_error, chosen=chosen.as_dict())
    section = {"recommended": float(chosen.threshold), "criterion": criterion, "table": _with_row(table, chosen)}
    return section, verdict


def _with_row(table: list[ThresholdRow], row: ThresholdRow) -> list[dict]:
    """The table's rows as dicts with ``row`` in its place by threshold (replacing a row of the same threshold)."""
    rows = [r for r in table if r.threshold != row.threshold] + [row]
    return [r.as_dict() for r in sorted(rows, key=lambda r: r.threshold)]


# ---------------------------------------------------------------------------------------------------------------
# calib tune: a threshold for a target (speed-up, compute fraction or error budget), chosen on the replay
# ---------------------------------------------------------------------------------------------------------------
ERROR_PROXY = (
    "mean over traced trajectories of sum over replayed skipped steps i of dsigma_i * staleness_i, where "
    "staleness_i = sum of the traced output_rel_l1 over the steps since the last computed step (up to and "
    "including i) and dsigma_i = sigma_i - sigma_(i+1) is the weight the sampler gives step i's output "
    "(1/steps when the traces have no sigmas)"
)
_BISECTION_STEPS = 60


def step_weights(traj) -> np.ndarray:
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
        errors.append(trajectory_error(decisions, traj.output_rel_l1, step_weights(traj)))
    if total == 0:
        raise ValueError("no trajectories to replay")
    return ThresholdRow(float(threshold), computed / total, float(np.mean(errors)))


# which skips the gate's verdict weighs (calib fit --method auto also measures skipping the last step)
GATE_SCOPE = "TeaCache's gate never skips the first or the last step"


def cheapest_skip(trace_set, rescalers: dict[str, Rescaler]) -> dict | None:
    """What skipping one step costs at the cheapest step the gate decides, predicted on the traces: per gated step
    (neither a generation's first nor its forced last), the mean over traced trajectories of the error proxy of
    skipping that step alone (:data:`ERROR_PROXY`: dsigma_i * output_rel_l1_i), and the step where it is smallest.
    None where no step is gated (two steps: both always compute)."""
    per_step: dict[int, list[float]] = {}
    counts = []
    for traj in trace_set.trajectories:
        if traj.component not in rescalers:
            continue
        y = np.asarray(traj.output_rel_l1, dtype=np.float64).reshape(-1)
        step_index = np.asarray(getattr(traj, "step_index", np.arange(len(y)))).reshape(-1)
        forced = forced_last_mask(traj, len(y))
        weights = step_weights(traj) if hasattr(traj, "step_index") else np.full(len(y), 1.0 / max(len(y), 1))
        counts.append(int(getattr(traj, "steps", len(y))))
        for i in range(1, len(y)):
            if forced[i] or not math.isfinite(y[i]):
                continue
            per_step.setdefault(int(step_index[i]), []).append(float(weights[i]) * float(y[i]))
    if not per_step:
        return None
    step, errors = min(per_step.items(), key=lambda kv: (float(np.mean(kv[1])), kv[0]))
    n = max(counts)
    return {"error": round(float(np.mean(errors)), 6), "step": step, "compute_fraction": round((n - 1) / n, 6),
            "skip": f"step {step} alone"}


def skip_verdict(trace_set, rescalers: dict[str, Rescaler], max_error: float, chosen: dict | None = None) -> dict:
    """The document's ``recommendation`` (:func:`calib.methods.quality.recommendation`) for a gate fitted on
    ``trace_set``: a cache only where the cheapest skip (:func:`cheapest_skip`) is predicted within ``max_error``."""
    cheapest = cheapest_skip(trace_set, rescalers)
    steps = max(int(getattr(t, "steps", len(t.output_rel_l1))) for t in trace_set.trajectories)
    cache = cheapest is not None and cheapest["error"] <= max_error
    return recommendation(cache=cache, max_error=max_error, steps=steps, cheapest=cheapest, basis="predicted",
                          scope=GATE_SCOPE, chosen=chosen if cache else None)


def max_useful_threshold(trace_set, rescalers: dict[str, Rescaler], *, indicator: str = "modulated_input",
                         normalization: str = "none") -> float:
    """A threshold above every trajectory's whole accumulated rescaled change: from there on only the first and the
    last steps compute, and a larger threshold changes nothing."""

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


def find_threshold(trace_set, rescalers: dict[str, Rescaler], goal: TuneGoal, *,
                   indicator: str = "modulated_input", normalization: str = "none") -> tuple[ThresholdRow, bool]:
    """``(row, reached)``: the threshold for ``goal`` by bisection over the replay. Fraction goals take the
    smallest threshold whose replayed compute fraction is <= the goal (the least skipping that reaches it);
    ``max_error`` takes the largest threshold whose error proxy is <= the budget. When the goal cannot be reached
    the row is the closest the rule gets and ``reached`` is False."""
    kw = dict(indicator=indicator, normalization=normalization)

    def row(t):
        return replay_row(trace_set, rescalers, t, **kw)

    top = max_useful_threshold(trace_set, rescalers, **kw)
    want = goal.fraction
    if want is not None:
        def ok(r):
            return r.compute_fraction <= want + 1e-12
        if ok(row(0.0)):
            return row(0.0), True
        hi_row = row(top)
        if not ok(hi_row):
            return hi_row, False
        lo, hi = bisect(lambda t: ok(row(t)), 0.0, top, _BISECTION_STEPS)
        chosen = row(_round_sig(hi, up=True))
        return (chosen, True) if ok(chosen) else (row(hi), True)
    budget = goal.value
    top_row = row(top)
    if top_row.predicted_error <= budget:
        return top_row, True
    lo, hi = bisect(lambda t: not row(t).predicted_error <= budget, 0.0, top, _BISECTION_STEPS)
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


def tuned_thresholds_section(table: list[ThresholdRow], chosen: ThresholdRow, goal: TuneGoal, reached: bool,
                             trace_set, cost_model: dict | None = None) -> dict:
    """The coefficient file's ``thresholds`` section as ``calib tune --write`` records it."""
    describe = goal.describe()
    rows = [row.as_dict() for row in table]
    if cost_model is not None:
        for out, row in zip(rows, table):
            out["predicted_wall_speedup"] = round(predicted_wall_speedup(cost_model, row.compute_fraction), 4)
        if goal.kind == "speedup":
            describe = (f"smallest threshold whose predicted wall-clock speed-up (cost model measured by calib eval) "
                        f"is >= {goal.value:g}x")
    section = {
        "recommended": float(chosen.threshold),
        "criterion": f"calib tune --{goal.option} {goal.value:g}: {describe}"
                     + ("" if reached else " — not reachable; closest threshold"),
        "target": {"kind": goal.kind, "value": float(goal.value), "reached": bool(reached)},
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
