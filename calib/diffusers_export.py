"""Exports to diffusers' own caches, measured on our traces: MagCache, First Block Cache, FasterCache.

Each writes a JSON object whose keys are exactly the config's constructor arguments, so one line loads it:

    pipe.transformer.enable_cache(MagCacheConfig(**json.load(open("magcache.json"))))
    pipe.transformer.enable_cache(FirstBlockCacheConfig(**json.load(open("fbcache.json"))))
    pipe.transformer.enable_cache(FasterCacheConfig(**json.load(open("fastercache.json")),
                                                    current_timestep_callback=lambda: pipe.current_timestep))

What each value is, read from diffusers' hooks (diffusers/hooks/mag_cache.py, first_block_cache.py, faster_cache.py):

* MagCache: ``mag_ratios[i]`` is, in its calibrate mode, ``mean over tokens of |r_i| / |r_i-1|`` where ``r`` is the
  block stack's residual (tail block's output hidden states minus head block's input ones), norm over the channel
  dim, and 1.0 for step 0. The tracer records exactly that per stream (``extra/residual_norm_ratio``); we average
  over trajectories and streams. Its skip decision depends on the ratios only (not on the live input), so the steps
  it computes are known exactly: we replay diffusers' rule and pick the smallest threshold that reaches the target.
* First Block Cache: the remaining blocks run when the rel-L1 change of the head block's residual against the one
  at the last *computed* step exceeds ``threshold``. The tracer records that residual's change between consecutive
  steps (``extra/head_residual_rel_l1``); the change against an older step is approximated by the sum of the
  consecutive changes since it (exact when the residual drifts in one direction; otherwise an upper bound, so the
  prediction errs towards computing more). Threshold picked for the target on that replay.
* FasterCache: from a ``fastercache-cfg`` file (:mod:`calib.fastercache`); its kwargs, the load lines and the
  rendering of all three moved to calib.targets.diffusers (issue 14), re-exported here for old imports. The MagCache
  and First Block Cache fits stay here until calib.methods.magcache / fbcache take them.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import CalibError
from .targets.diffusers import LOAD_LINES, fastercache_config, fastercache_warnings  # noqa: F401  (old imports)

MAGCACHE_RETENTION_RATIO = 0.2  # MagCache's (and diffusers') default: the first 20 % of steps always compute
MAGCACHE_MAX_SKIP_STEPS = 3  # K in the paper, diffusers' default

def _component_trajs(trace_set, component):
    trajs = [t for t in trace_set.trajectories if t.component == component]
    if not trajs:
        have = sorted({t.component for t in trace_set.trajectories})
        raise CalibError(f"no trajectories of component {component!r}; the traces hold {have}")
    lengths = sorted({len(t.step_index) for t in trajs})
    if len(lengths) != 1:
        raise CalibError(f"trajectories have different step counts {lengths}; export one --steps at a time")
    return trajs


def _series(trajs, name, what):
    missing = [t for t in trajs if name not in t.extra]
    if missing:
        raise CalibError(
            f"the traces have no extra/{name} series ({what}); they were written before calib recorded it — "
            "trace again with this version"
        )
    return np.stack([np.asarray(t.extra[name], dtype=np.float64) for t in trajs])


# ---------------------------------------------------------------------------------------------------------------
# MagCache
# ---------------------------------------------------------------------------------------------------------------
def mag_ratios(trace_set, component: str = "transformer") -> list[float]:
    trajs = _component_trajs(trace_set, component)
    stack = _series(trajs, "residual_norm_ratio", "MagCache's magnitude ratio of the stack residual")
    stack = stack[np.all(np.isfinite(stack[:, 1:]), axis=1)]
    if len(stack) == 0:
        raise CalibError("every trajectory holds NaN residual ratios (does the block stack keep its token count?)")
    ratios = stack.mean(axis=0)
    ratios[0] = 1.0
    return [float(r) for r in ratios]


def magcache_replay(ratios, threshold: float, *, num_steps: int, retention_ratio: float = MAGCACHE_RETENTION_RATIO,
                    max_skip_steps: int = MAGCACHE_MAX_SKIP_STEPS) -> list[bool]:
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


def _pick(thresholds, fraction_of, target_speedup):
    """The smallest threshold whose predicted speed-up (1 / compute fraction) reaches the target, else the best."""
    rows = [(float(t), fraction_of(float(t))) for t in thresholds]
    rows.sort()
    want = 1.0 / target_speedup
    for t, f in rows:
        if f <= want + 1e-12:
            return t, f, rows, True
    t, f = min(rows, key=lambda r: (r[1], r[0]))
    return t, f, rows, False


def magcache_config(trace_set, *, target_speedup: float, threshold: float | None = None,
                    component: str = "transformer") -> tuple[dict, dict]:
    """(MagCacheConfig kwargs, info with the replayed schedule)."""
    ratios = mag_ratios(trace_set, component)
    n = len(ratios)

    def fraction(t):
        return sum(magcache_replay(ratios, t, num_steps=n)) / n

    if threshold is None:
        errs = [abs(1 - r) for r in ratios[1:] if abs(1 - r) > 0] or [1e-4]
        # acc_err sums up to max_skip_steps + 1 terms, each at most about (steps so far) x the largest |1 - ratio|
        grid = sorted({0.0, *np.geomspace(max(min(errs), 1e-6) / 2, max(errs) * 12, 240)})
        threshold, _, rows, reached = _pick(grid, fraction, target_speedup)
    else:
        rows, reached = [], None
    kwargs = {
        "threshold": round(float(threshold), 6),
        "max_skip_steps": MAGCACHE_MAX_SKIP_STEPS,
        "retention_ratio": MAGCACHE_RETENTION_RATIO,
        "num_inference_steps": n,
        "mag_ratios": [round(r, 6) for r in ratios],
    }
    schedule = magcache_replay(kwargs["mag_ratios"], kwargs["threshold"], num_steps=n)
    info = {
        "computed_steps": [i for i, c in enumerate(schedule) if c],
        "compute_fraction": sum(schedule) / n,
        "target_reached": reached,
        "table": rows,
    }
    return kwargs, info


# ---------------------------------------------------------------------------------------------------------------
# First Block Cache
# ---------------------------------------------------------------------------------------------------------------
def fbcache_replay(changes, threshold: float) -> list[bool]:
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


def fbcache_config(trace_set, *, target_speedup: float, threshold: float | None = None,
                   component: str = "transformer") -> tuple[dict, dict]:
    trajs = _component_trajs(trace_set, component)
    stack = _series(trajs, "head_residual_rel_l1", "the change of the first block's residual")
    stack = stack[np.all(np.isfinite(stack[:, 1:]), axis=1)]
    if len(stack) == 0:
        raise CalibError("every trajectory holds NaN first-block residual changes")
    n = stack.shape[1]

    def fraction(t):
        return float(np.mean([sum(fbcache_replay(row, t)) / n for row in stack]))

    if threshold is None:
        finite = stack[:, 1:][stack[:, 1:] > 0]
        grid = [0.0, *np.geomspace(float(finite.min()) / 2, float(stack[:, 1:].sum(axis=1).max()), 300)]
        threshold, _, rows, reached = _pick(grid, fraction, target_speedup)
    else:
        rows, reached = [], None
    kwargs = {"threshold": round(float(threshold), 6)}
    per_traj = [sum(fbcache_replay(row, kwargs["threshold"])) for row in stack]
    info = {
        "computed_steps_mean": float(np.mean(per_traj)),
        "compute_fraction": float(np.mean(per_traj)) / n,
        "steps": n,
        "target_reached": reached,
        "table": rows,
    }
    return kwargs, info
