"""First Block Cache (diffusers' ``FirstBlockCacheConfig``), calibrated on traces: the threshold for a target.

The remaining blocks run when the rel-L1 change of the head block's residual against the one at the last *computed*
step exceeds ``threshold``. The tracer records that residual's change between consecutive steps
(``extra/head_residual_rel_l1``); the change against an older step is approximated by the sum of the consecutive
changes since it (exact when the residual drifts in one direction; otherwise an upper bound, so the prediction errs
towards computing more). The threshold is picked for the target on that replay. ``calib export --format
diffusers-fbcache`` renders the result (calib.exports.diffusers); there is no calib document.
"""

from __future__ import annotations

import math

import numpy as np

from calib.errors import CalibError
from calib.methods.base import FitContext, Fitted
from calib.methods.fbcache.options import FbcacheOptions
from calib.methods.trace_series import component_trajectories, pick_threshold, stacked_extra


def replay(changes, threshold: float) -> list[bool]:
    """FBCHeadBlockHook per step (True = the remaining blocks compute) for one stream; the change against the last
    computed step is approximated by the sum of the consecutive changes since then."""
    out = []
    acc = 0.0
    for i, c in enumerate(changes):
        if i == 0:
            out.append(True)
            continue
        acc += float(c) if math.isfinite(float(c)) else math.inf
        compute = acc > threshold
        if compute:
            acc = 0.0
        out.append(compute)
    return out


def fit_config(trace_set, *, target_speedup: float, threshold: float | None = None,
               component: str = "transformer") -> tuple[dict, dict]:
    """(FirstBlockCacheConfig kwargs, info with the predicted compute); ``threshold`` None: the smallest reaching
    ``target_speedup`` in full forwards."""
    stack = stacked_extra(component_trajectories(trace_set, component), "head_residual_rel_l1",
                          "the change of the first block's residual")
    stack = stack[np.all(np.isfinite(stack[:, 1:]), axis=1)]
    if len(stack) == 0:
        raise CalibError("every trajectory holds NaN first-block residual changes")
    n = stack.shape[1]

    def fraction(t):
        return float(np.mean([sum(replay(row, t)) / n for row in stack]))

    if threshold is None:
        finite = stack[:, 1:][stack[:, 1:] > 0]
        grid = [0.0, *np.geomspace(float(finite.min()) / 2, float(stack[:, 1:].sum(axis=1).max()), 300)]
        threshold, _, rows, reached = pick_threshold(grid, fraction, target_speedup)
    else:
        rows, reached = [], None
    kwargs = {"threshold": round(float(threshold), 6)}
    per_traj = [sum(replay(row, kwargs["threshold"])) for row in stack]
    info = {
        "computed_steps_mean": float(np.mean(per_traj)),
        "compute_fraction": float(np.mean(per_traj)) / n,
        "steps": n,
        "target_reached": reached,
        "table": rows,
    }
    return kwargs, info


def fit(traces, options: FbcacheOptions, context: FitContext) -> Fitted:
    """The config kwargs and what the replay predicts (what ``calib export --format diffusers-fbcache`` renders)."""
    return Fitted(fit_config(traces, target_speedup=options.target_speedup, threshold=options.threshold,
                             component=options.component))
