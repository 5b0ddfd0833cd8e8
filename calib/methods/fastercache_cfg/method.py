"""FasterCache's CFG cache (Lv et al., arXiv 2410.19355) calibrated from traces.

FasterCache observes that the difference between the conditional and the unconditional prediction changes little
from one step to the next over part of the denoising, so there the unconditional pass can be dropped and replaced
by the conditional output plus the difference reused from the last step that ran both. How far that reuse can go is
model dependent; diffusers leaves it to the user (``unconditional_batch_skip_range``,
``unconditional_batch_timestep_skip_range``). Here it comes from the data: the tracer records, per generation, the
rel-L1 change of ``cond - uncond`` between steps (``extra/cfg_delta_rel_l1``).

Derivation, per component, on the per-step median of that change over generations, ``c[s]``:

* diffusers' rule (``FasterCacheDenoiserHook``): at iteration ``s`` the unconditional pass is skipped when
  ``s > 0``, the timestep is inside the range, and ``s % N != 0``; the reused difference is the one of the last
  iteration that computed both, ``k``. Its staleness is the accumulated change ``c[k+1] + ... + c[s]``.
* For each skip range ``N`` (2 .. 10) and each contiguous run of steps ``[a, b]``, the run is admissible when every
  step it skips has staleness <= ``tolerance``; we keep the (N, run) that skips the most unconditional passes
  (ties: smaller N). ``tolerance`` defaults to twice the median per-step change (a reused difference at most two
  typical steps old), and can be set.
* The run becomes exclusive timestep bounds halfway between neighbouring timesteps, as diffusers compares them
  (``low < t < high``).

The spatial-attention reuse (``spatial_attention_block_skip_range``/``_timestep_skip_range``) is derived the same
way from the per-step median change of the block outputs (the traces hold block outputs, not attention outputs:
a proxy, stated in the file). diffusers only reuses attention on steps whose unconditional pass is skipped.
"""

from __future__ import annotations

import math

import numpy as np

from calib.coeffs.header import header
from calib.errors import CalibError
from calib.methods.base import FitContext, Fitted
from calib.methods.fastercache_cfg.options import FastercacheCfgOptions

MAX_SKIP_RANGE = 10
TOLERANCE_FACTOR = 2.0
# diffusers' FasterCacheConfig._unconditional_conditional_input_kwargs_identifiers, and the classes whose forward
# also takes a batched pooled projection (it must be split with the others or the batch sizes disagree).
DIFFUSERS_COND_UNCOND_KWARGS = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                                "encoder_attention_mask")
POOLED_PROJECTION_CLASSES = ("FluxTransformer2DModel", "SD3Transformer2DModel")
BFCHW_CLASSES = ("CogVideoXTransformer3DModel", "LatteTransformer3DModel")
RULE = (
    "unconditional pass skipped at iteration s when s > 0, low < timestep < high and s % N != 0; the reused "
    "cond-uncond difference is then s - k steps old (k the last iteration that ran both); the range and N are the "
    "admissible ones (every skipped step's accumulated change of cond - uncond since k <= tolerance) that skip most"
)


def _median_over(series: list[np.ndarray]) -> np.ndarray:
    import warnings

    stack = np.stack(series).astype(np.float64)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (entry 0) are expected
        out = np.nanmedian(np.where(np.isfinite(stack), stack, np.nan), axis=0)
    out[0] = np.nan
    return out


def cfg_series(trace_set, component: str = "transformer"):
    """(per-step median change of cond - uncond, timesteps, generations) for one component."""
    trajs = [t for t in trace_set.trajectories if t.component == component]
    if not trajs:
        raise CalibError(f"no trajectories of component {component!r} in the traces")
    streams = {t.stream for t in trajs}
    if not {"cond", "uncond"} <= streams:
        raise CalibError(
            f"component {component!r}: the traces hold streams {sorted(streams)}, no cond/uncond pair; FasterCache's "
            "CFG cache needs classifier-free guidance — trace with --guidance > 1"
        )
    with_delta = [t for t in trajs if t.stream == "cond" and "cfg_delta_rel_l1" in t.extra]
    if not with_delta:
        raise CalibError(
            "the traces have no extra/cfg_delta_rel_l1 series (written by calib 0.1.0 after this series was added); "
            "trace again to record the change of cond - uncond"
        )
    lengths = sorted({len(t.step_index) for t in with_delta})
    if len(lengths) != 1:
        raise CalibError(f"trajectories have different step counts {lengths}; fit one --steps at a time")
    c = _median_over([t.extra["cfg_delta_rel_l1"] for t in with_delta])
    return c, np.asarray(with_delta[0].timesteps, dtype=np.float64), len(with_delta)


def block_series(trace_set, component: str = "transformer") -> np.ndarray:
    """Per-step median change of the block outputs (over blocks and trajectories); the output change without
    per-block data."""
    trajs = [t for t in trace_set.trajectories if t.component == component]
    if trajs and all(t.block_rel_l1.shape[1] > 0 for t in trajs):
        rows = [t.block_rel_l1.astype(np.float64) for t in trajs]
        return _median_over([np.concatenate([[np.nan], np.median(r[1:], axis=1)]) for r in rows])
    return _median_over([t.output_rel_l1 for t in trajs])


def skipped_steps(n_steps: int, skip_range: int, run: tuple[int, int] | None) -> list[int]:
    """Iterations diffusers skips for this N and step run (the run already mapped back from timesteps)."""
    if run is None or skip_range < 2:
        return []
    a, b = run
    return [s for s in range(max(a, 1), b + 1) if s % skip_range != 0]


def staleness(c: np.ndarray, skip_range: int, a: int, s: int) -> float:
    """Accumulated change since the last iteration that computed, for a skipped iteration s in a run starting a."""
    k = max(a - 1, skip_range * (s // skip_range))
    seg = c[k + 1 : s + 1]
    return float(np.sum(np.where(np.isfinite(seg), seg, np.inf)))


def best_run(c, tolerance: float, max_skip_range: int = MAX_SKIP_RANGE):
    """(N, (a, b) or None, skipped steps): the admissible run and skip range that skip the most iterations."""
    c = np.asarray(c, dtype=np.float64)
    n = len(c)
    best = (0, 1, None)  # (skipped count, -N, run) compared as a tuple
    best_n = 1
    for skip in range(2, max(2, min(max_skip_range, n)) + 1):
        for a in range(1, n):
            b = a - 1
            for s in range(a, n):
                if s % skip != 0 and staleness(c, skip, a, s) > tolerance:
                    break
                b = s
            if b < a:
                continue
            count = len(skipped_steps(n, skip, (a, b)))
            if count == 0:
                continue
            key = (count, -skip)
            if key > best[:2]:
                best = (count, -skip, (a, b))
                best_n = skip
    if best[2] is None:
        return 1, None, []
    skipped = skipped_steps(n, best_n, best[2])
    # the run's ends may be iterations that compute anyway (multiples of N): the range needs only the skipped ones
    run = (skipped[0], skipped[-1])
    return best_n, run, skipped


def timestep_bounds(timesteps, run) -> list[float]:
    """Exclusive (low, high) bounds around the run's timesteps, halfway to the neighbours (diffusers: low < t < high).
    An empty run gives [0, 0], which no timestep satisfies."""
    t = np.asarray(timesteps, dtype=np.float64)
    if run is None:
        return [0.0, 0.0]
    a, b = run
    high = (t[a - 1] + t[a]) / 2 if a > 0 else t[a] + 1.0
    low = (t[b] + t[b + 1]) / 2 if b + 1 < len(t) else -1.0
    return [float(low), float(high)]


def steps_in(timesteps, bounds) -> list[int]:
    lo, hi = bounds
    return [i for i, t in enumerate(np.asarray(timesteps, dtype=np.float64)) if lo < t < hi]


def tensor_format(model_class: str, resolution: list) -> str:
    if model_class in BFCHW_CLASSES:
        return "BFCHW"
    return "BCFHW" if resolution and len(resolution[0]) == 3 else "BCHW"


def _nullable(values) -> list:
    return [None if not math.isfinite(float(v)) else float(v) for v in values]


def derive(trace_set, component: str = "transformer", *, cfg_tolerance: float | None = None,
           attention_tolerance: float | None = None) -> dict:
    """The fastercache_cfg entry for one component."""
    c, timesteps, generations = cfg_series(trace_set, component)
    m = block_series(trace_set, component)
    finite_c = c[1:][np.isfinite(c[1:])]
    finite_m = m[1:][np.isfinite(m[1:])]
    if finite_c.size == 0:
        raise CalibError(f"component {component!r}: no finite cond - uncond changes in the traces")
    tol_c = float(cfg_tolerance) if cfg_tolerance is not None else TOLERANCE_FACTOR * float(np.median(finite_c))
    tol_m = (float(attention_tolerance) if attention_tolerance is not None
             else TOLERANCE_FACTOR * float(np.median(finite_m)) if finite_m.size else 0.0)
    if tol_c < 0 or tol_m < 0:
        raise CalibError("tolerances must be >= 0")
    n_u, run_u, skip_u = best_run(c, tol_c)
    n_a, run_a, _ = best_run(m, tol_m)
    bounds_u = timestep_bounds(timesteps, run_u)
    bounds_a = timestep_bounds(timesteps, run_a)
    att_skipped = [s for s in skipped_steps(len(m), n_a, run_a) if s in set(skip_u)]
    return {
        "steps": int(len(c)),
        "timesteps": [float(t) for t in timesteps],
        "trajectories": int(generations),
        "cfg_delta_change": _nullable(c),
        "block_change": _nullable(m),
        "cfg_tolerance": tol_c,
        "attention_tolerance": tol_m,
        "unconditional_batch_skip_range": int(n_u),
        "unconditional_batch_timestep_skip_range": bounds_u,
        "uncond_skipped_steps": [int(s) for s in skip_u],
        "uncond_compute_fraction": 1.0 - len(skip_u) / len(c),
        "spatial_attention_block_skip_range": int(n_a),
        "spatial_attention_timestep_skip_range": bounds_a,
        "attention_skipped_steps": [int(s) for s in att_skipped],
    }


def build_document(trace_set, *, cfg_tolerance=None, attention_tolerance=None, created=None) -> dict:
    """The fastercache-cfg document (unvalidated: :func:`calib.methods.registry.validate` checks it)."""
    head = header("fastercache-cfg", trace_set, created)
    model_class = head["model"]["class"]
    components = sorted({t.component for t in trace_set.trajectories})
    section = {"rule": RULE, "components": {}}
    for name in components:
        entry = derive(trace_set, name, cfg_tolerance=cfg_tolerance, attention_tolerance=attention_tolerance)
        entry["tensor_format"] = tensor_format(model_class, head["calibration"].get("resolution", []))
        entry["is_guidance_distilled"] = False
        kwargs = list(DIFFUSERS_COND_UNCOND_KWARGS)
        if model_class in POOLED_PROJECTION_CLASSES:
            kwargs.append("pooled_projections")
        entry["cond_uncond_kwargs"] = kwargs
        section["components"][name] = entry
    doc = {
        **head,
        "fastercache_cfg": section,
        "provenance": {
            "source": "measured",
            "notes": ("attention ranges use the block-output change as a proxy for the attention-output change; "
                      f"derived by calib from {len(trace_set.trajectories)} traced trajectories"),
        },
    }
    return doc


def fit(traces, options: FastercacheCfgOptions, context: FitContext) -> Fitted:
    """The skip ranges per component (no figure: ``--no-plot`` is accepted and changes nothing)."""
    return Fitted(build_document(traces, cfg_tolerance=options.cfg_tolerance))


def describe(doc: dict) -> list[str]:
    lines = []
    for name, comp in doc["fastercache_cfg"]["components"].items():
        lo, hi = comp["unconditional_batch_timestep_skip_range"]
        lines.append(f"{name}: unconditional pass skipped at steps {comp['uncond_skipped_steps']} "
                     f"(N = {comp['unconditional_batch_skip_range']}, {lo:.6g} < t < {hi:.6g}; reused difference at "
                     f"most {comp['cfg_tolerance']:.3g} rel-L1 stale); {comp['uncond_compute_fraction']:.0%} of "
                     "unconditional passes computed")
    return lines
