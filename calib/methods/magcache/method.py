"""MagCache (diffusers' ``MagCacheConfig``), calibrated on traces: ``mag_ratios`` and the threshold for a target.

``mag_ratios[i]`` is what diffusers' calibrate mode measures: the mean over tokens of ``|r_i| / |r_(i-1)|``, where
``r`` is the block stack's residual (the tail block's output hidden states minus the head block's input ones),
normed over the channel dim, and 1.0 for step 0. The tracer records exactly that per stream
(``extra/residual_norm_ratio``); the fit averages it over trajectories and streams. diffusers' skip decision depends
on the ratios only, not on the live input, so the steps it computes are known exactly: the fit replays diffusers'
rule and picks the smallest threshold that reaches the target. ``calib export --format diffusers-magcache`` renders
the result (calib.exports.diffusers); there is no calib document.
"""

from __future__ import annotations

import numpy as np

from calib.errors import CalibError
from calib.methods.base import FitContext, Fitted
from calib.methods.magcache.options import MagcacheOptions
from calib.methods.trace_series import component_trajectories, pick_threshold, stacked_extra

RETENTION_RATIO = 0.2  # MagCache's (and diffusers') default: the first 20 % of steps always compute
MAX_SKIP_STEPS = 3  # K in the paper, diffusers' default


def mag_ratios(trace_set, component: str = "transformer") -> list[float]:
    """The traced magnitude ratios of ``component``'s stack residual, averaged over its trajectories."""
    stack = stacked_extra(component_trajectories(trace_set, component), "residual_norm_ratio",
                          "MagCache's magnitude ratio of the stack residual")
    stack = stack[np.all(np.isfinite(stack[:, 1:]), axis=1)]
    if len(stack) == 0:
        raise CalibError("every trajectory holds NaN residual ratios (does the block stack keep its token count?)")
    ratios = stack.mean(axis=0)
    ratios[0] = 1.0
    return [float(r) for r in ratios]


def replay(ratios, threshold: float, *, num_steps: int, retention_ratio: float = RETENTION_RATIO,
           max_skip_steps: int = MAX_SKIP_STEPS) -> list[bool]:
    """diffusers' MagCacheHeadHook decision per step (True = compute), for one stream."""
    ratios = list(ratios)
    if len(ratios) != num_steps:  # diffusers' nearest_interp
        scale = (len(ratios) - 1) / (num_steps - 1) if num_steps > 1 else 0.0
        ratios = [ratios[int(round(i * scale))] for i in range(num_steps)] if num_steps > 1 else ratios[-1:]
    retention_step = int(retention_ratio * num_steps + 0.5)
    acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
    have_residual = False
    out = []
    for step in range(num_steps):
        compute = True
        if step >= retention_step:
            scale = ratios[step] if step < len(ratios) else 1.0
            acc_ratio *= scale
            acc_steps += 1
            acc_err += abs(1.0 - acc_ratio)
            if have_residual and acc_err <= threshold and acc_steps <= max_skip_steps:
                compute = False
            else:
                acc_ratio, acc_steps, acc_err = 1.0, 0, 0.0
        if compute:
            have_residual = True
        out.append(compute)
    return out


def fit_config(trace_set, *, target_speedup: float, threshold: float | None = None,
               component: str = "transformer") -> tuple[dict, dict]:
    """(MagCacheConfig kwargs, info with the replayed schedule); ``threshold`` None: the smallest reaching
    ``target_speedup`` in full forwards."""
    ratios = mag_ratios(trace_set, component)
    n = len(ratios)

    def fraction(t):
        return sum(replay(ratios, t, num_steps=n)) / n

    if threshold is None:
        errs = [abs(1 - r) for r in ratios[1:] if abs(1 - r) > 0] or [1e-4]
        # acc_err sums up to max_skip_steps + 1 terms, each at most about (steps so far) x the largest |1 - ratio|
        grid = sorted({0.0, *np.geomspace(max(min(errs), 1e-6) / 2, max(errs) * 12, 240)})
        threshold, _, rows, reached = pick_threshold(grid, fraction, target_speedup)
    else:
        rows, reached = [], None
    kwargs = {
        "threshold": round(float(threshold), 6),
        "max_skip_steps": MAX_SKIP_STEPS,
        "retention_ratio": RETENTION_RATIO,
        "num_inference_steps": n,
        "mag_ratios": [round(r, 6) for r in ratios],
    }
    schedule = replay(kwargs["mag_ratios"], kwargs["threshold"], num_steps=n)
    info = {
        "computed_steps": [i for i, c in enumerate(schedule) if c],
        "compute_fraction": sum(schedule) / n,
        "target_reached": reached,
        "table": rows,
    }
    return kwargs, info


def fit(traces, options: MagcacheOptions, context: FitContext) -> Fitted:
    """The config kwargs and what the replay predicts (what ``calib export --format diffusers-magcache`` renders)."""
    return Fitted(fit_config(traces, target_speedup=options.target_speedup, threshold=options.threshold,
                             component=options.component))
