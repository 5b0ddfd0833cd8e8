"""First Block Cache (diffusers' ``FirstBlockCacheConfig``), calibrated on traces: the threshold for a target.

diffusers' rule (``hooks/first_block_cache.py``, ``FBCHeadBlockHook``), per cache context (one per CFG branch for a
pipeline that calls the transformer once per branch; one for a batched [uncond, cond] call): the remaining blocks
run when ``mean|r_t - r_c| / mean|r_c|`` exceeds ``threshold``, where ``r`` is the head block's residual (its output
minus its input hidden states), ``c`` the last call that ran them, and the means are over the whole call's tensor
(both rows of a batched CFG call together). The tracer records, per row, ``mean|r_t|`` and ``mean|r_t - r_t-k|``
against each of the stream's last ``k = 1..8`` calls (``extra/head_residual_absmean``, ``head_residual_diff{k}``);
the rows of one batched call are summed, so the replay below is diffusers' decision exactly for gaps up to 8. A
longer gap (a large threshold) is bounded by the triangle inequality over lag-8 hops, which errs towards computing
more; the fit says when that happened (``exact``). ``calib export --format diffusers-fbcache`` renders the result
(calib.exports.diffusers); there is no calib document.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from calib.errors import CalibError
from calib.methods.base import FitContext, Fitted
from calib.methods.fbcache.options import FbcacheOptions
from calib.methods.trace_series import component_trajectories, pick_threshold, stacked_extra

LAG_SERIES = "head_residual_diff{}"


def replay(absmean, diffs, threshold: float) -> tuple[list[bool], bool]:
    """diffusers' FBCHeadBlockHook decision per call of one cache context (True = the remaining blocks run), and
    whether every comparison was exact. ``absmean[t]`` is ``mean|r_t|``, ``diffs[k - 1][t]`` is
    ``mean|r_t - r_t-k|``; a gap longer than ``len(diffs)`` is bounded above by hops of the longest lag."""
    lags = len(diffs)
    out, exact, ref = [], True, None
    for t in range(len(absmean)):
        compute = True
        if ref is not None:
            gap, num, pos = t - ref, 0.0, t
            while pos - ref > lags:  # triangle inequality: |r_t - r_c| <= |r_t - r_t-L| + |r_t-L - r_c|
                num += float(diffs[lags - 1][pos])
                pos -= lags
            num += float(diffs[pos - ref - 1][pos])
            exact = exact and gap <= lags
            change = num / float(absmean[ref]) if float(absmean[ref]) > 0 else math.inf
            compute = not (math.isfinite(change) and change <= threshold)
        if compute:
            ref = t
        out.append(compute)
    return out, exact


def contexts(trajs) -> list[tuple[np.ndarray, np.ndarray]]:
    """(absmean, diffs) per cache context: one per trajectory, except the rows of one batched call (``call_rows``
    > 1), whose numerators and denominators are summed (diffusers' mean over the call's whole tensor; the rows
    hold equally many elements)."""
    absmean = stacked_extra(trajs, "head_residual_absmean", "the first block's residual, per lag")
    lags = sorted(int(name[len(LAG_SERIES.format("")):]) for name in trajs[0].extra
                  if name.startswith(LAG_SERIES.format("")))
    diffs = np.stack([stacked_extra(trajs, LAG_SERIES.format(k), "the first block's residual, per lag")
                      for k in lags], axis=1)  # (trajectories, lags, steps)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(trajs):
        rows = t.extra.get("call_rows")
        batched = rows is not None and len(rows) and float(np.nanmax(rows)) > 1
        groups[(t.prompt, t.seed, t.component) if batched else ("trajectory", i)].append(i)
    return [(absmean[idx].sum(axis=0), diffs[idx].sum(axis=0)) for idx in groups.values()]


def fit_config(trace_set, *, target_speedup: float, threshold: float | None = None,
               component: str = "transformer") -> tuple[dict, dict]:
    """(FirstBlockCacheConfig kwargs, info with the predicted compute); ``threshold`` None: the smallest reaching
    ``target_speedup`` in full forwards."""
    units = [(a, d) for a, d in contexts(component_trajectories(trace_set, component))
             if np.all(np.isfinite(a)) and np.all(np.isfinite(d[0][1:]))]
    if not units:
        raise CalibError("every trajectory holds NaN first-block residuals")
    n = len(units[0][0])

    def runs(t):
        return [replay(a, d, t) for a, d in units]

    def fraction(t):
        return float(np.mean([sum(r) / n for r, _ in runs(t)]))

    if threshold is None:
        ratios = np.concatenate([d[0][1:] / a[:-1] for a, d in units])
        ratios = ratios[ratios > 0]
        top = max(float(np.sum(d[0][1:]) / np.min(a)) for a, d in units) if ratios.size else 1.0  # >= any change
        grid = [0.0, *np.geomspace(float(ratios.min()) / 2 if ratios.size else 1e-6, top, 300)]
        threshold, _, rows, reached = pick_threshold(grid, fraction, target_speedup)
    else:
        rows, reached = [], None
    kwargs = {"threshold": round(float(threshold), 6)}
    replayed = runs(kwargs["threshold"])
    per_context = [sum(r) for r, _ in replayed]
    info = {
        "computed_steps_mean": float(np.mean(per_context)),
        "computed_steps_range": [int(min(per_context)), int(max(per_context))],
        "compute_fraction": float(np.mean(per_context)) / n,
        "steps": n,
        "contexts": len(units),
        "exact": all(e for _, e in replayed),
        "target_reached": reached,
        "table": rows,
    }
    return kwargs, info


def fit(traces, options: FbcacheOptions, context: FitContext) -> Fitted:
    """The config kwargs and what the replay predicts (what ``calib export --format diffusers-fbcache`` renders)."""
    return Fitted(fit_config(traces, target_speedup=options.target_speedup, threshold=options.threshold,
                             component=options.component))
