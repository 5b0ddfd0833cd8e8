"""cache-dit's DBCache (cache-dit 1.5, an optional dependency: ``pip install 'calib[bench]'``, imported only here)
with each of its calibrators, through cache-dit's own FLUX / Wan block adapters.

DBCache always computes the first ``Fn`` blocks of a step, compares their output residual with the previous step's
(relative L1 against ``residual_diff_threshold``), and on a cache hit skips the middle blocks and adds the cached
residual, then computes the last ``Bn`` blocks. A calibrator forecasts that residual instead of reusing it:
TaylorSeer (``TaylorSeerCalibratorConfig``, Taylor expansion of order 1 or 2 around the last computed step), DMD
(``DMDCalibratorConfig``: dynamic mode decomposition of the last ``dmd_history`` computed snapshots, an exponential
basis) and FoCa (``FoCaCalibratorConfig``: a BDF2 predictor with a Heun corrector, arXiv 2508.16211). It always pays
its ``Fn`` (and ``Bn``) blocks, so its compute share is above its fraction of full forwards: both axes are searched.

What cache-dit recommends (its config's defaults and docs): ``Fn_compute_blocks`` 8, ``Bn_compute_blocks`` 0,
``residual_diff_threshold`` 0.08, ``max_warmup_steps`` 8, TaylorSeer order 1 ("1 or 2"), DMD history 6 ("5-6 is
the sweet spot"), rank chosen from the spectrum, ridge 1e-8; FoCa has no knobs. ``Fn`` 8 is more blocks than the
built-in models have (6 and 4), so the structures swept are the ones they can hold.

Swept here, per calibrator (none; TaylorSeer orders 1 and 2; DMD at its defaults; FoCa):

* F1B0 with warm-ups 0, 1, 2 and cache-dit's default 8, the residual threshold bisected over real runs to each
  target on both axes (fraction of full forwards and compute share);
* F2B0 and F1B1 at the warm-up that did best for each target, bisected the same way;
* ``steps_computation_mask`` with the ``"static"`` policy (fixed computed steps, the calibrator forecasting the
  others) at F1B0: cache-dit's predefined masks (``steps_mask``: slow, medium, fast, ultra) and every-k masks after a
  warm-up (TaylorSeer's schedules nearest each target). A mask fixes the fraction of full forwards exactly, where the
  threshold can only be bisected to it.

cache-dit counts every transformer call as a step unless ``enable_separate_cfg``: it is set where the pipeline calls
the transformer once per CFG branch (the harness measures the calls per step); the built-in pipelines batch CFG in
one call. Its ``disable_cache`` leaves a FLUX transformer's blocks patched (diffusers' own caches fail after it), so
its rows run last; each row checks that the model's output is restored."""

from __future__ import annotations

import logging
import os

from calib.errors import CalibError
from calib.evaluate.peers.common import peer_row, checked, nearest_settings, threshold_points
from calib.evaluate.peers.taylorseer import TAYLORSEER_INTERVALS, taylorseer_fraction

CACHE_DIT_WARMUPS = (0, 1, 2, 8)  # 8: cache-dit's default
CACHE_DIT_STRUCTURES = ((2, 0), (1, 1))  # (Fn, Bn) besides F1B0
CACHE_DIT_THRESHOLD = 0.1  # where the bisection starts (cache-dit's default is 0.08)
MASK_POLICIES = ("slow", "medium", "fast", "ultra")
MASKS_PER_TARGET = 2
CALIBRATORS = {  # row -> its calibrator settings ({} for none)
    "cache-dit": ({},),
    "cache-dit-taylorseer": ({"calibrator": "taylorseer", "order": 1}, {"calibrator": "taylorseer", "order": 2}),
    "cache-dit-dmd": ({"calibrator": "dmd"},),
    "cache-dit-foca": ({"calibrator": "foca"},),
}


def quiet_cache_dit():
    """cache-dit imported with its logging at ERROR (it logs every enable), or a one-line error."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    try:
        import cache_dit
    except ImportError:
        raise CalibError("cache-dit is not installed (pip install 'calib[bench]' or pip install cache-dit)") from None
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return cache_dit


def cache_dit_adapter(pipe):
    """cache-dit's own BlockAdapter for the pipeline's transformer class (its registry keys on pipeline class
    names, which the built-in pipelines do not share)."""
    cache_dit = quiet_cache_dit()
    from cache_dit.caching.block_adapters import adapters

    name = type(pipe.transformer).__name__
    for prefix, make in (("Flux", adapters.flux_adapter), ("Wan", adapters.wan_adapter)):
        if name.startswith(prefix):
            return make(pipe)
    try:
        return cache_dit.get_adapter(pipe)
    except Exception as exc:  # noqa: BLE001 - cache-dit has no adapter for this pipeline
        raise CalibError(f"cache-dit has no block adapter for {type(pipe).__name__} / {name}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def calibrator_config(calibrator: dict):
    """A fresh cache-dit calibrator config for ``{"calibrator": "taylorseer", "order": k}``, ``dmd``, ``foca``."""
    from cache_dit import DMDCalibratorConfig, FoCaCalibratorConfig, TaylorSeerCalibratorConfig

    kind = calibrator.get("calibrator")
    if kind is None:
        return None
    if kind == "taylorseer":
        return TaylorSeerCalibratorConfig(taylorseer_order=calibrator["order"])
    if kind == "dmd":
        return DMDCalibratorConfig()
    if kind == "foca":
        return FoCaCalibratorConfig()
    raise ValueError(f"unknown cache-dit calibrator {kind!r}")


def dbcache_install(harness, adapter, calibrator: dict, *, threshold: float, fn: int = 1, bn: int = 0,
                    warmup: int = 2, mask: list[int] | None = None):
    """``install() -> undo``: DBCache on the harness's pipeline."""
    cache_dit = quiet_cache_dit()
    from cache_dit import DBCacheConfig

    def install():
        cache_dit.enable_cache(
            adapter,
            cache_config=DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=threshold,
                                       max_warmup_steps=warmup, num_inference_steps=harness.steps,
                                       enable_separate_cfg=harness.calls_per_step > 1,
                                       steps_computation_mask=mask,
                                       steps_computation_policy="static" if mask is not None else "dynamic"),
            calibrator_config=calibrator_config(calibrator))
        return lambda: cache_dit.disable_cache(adapter)

    return install


def every_k_mask(interval: int, before: int, n: int) -> list[int]:
    """TaylorSeer's schedule as a cache-dit mask: every step before ``before``, then every ``interval``-th."""
    return [1 if s < before or (s - before - 1) % interval == 0 else 0 for s in range(n)]


def _masks(n: int, targets) -> list[tuple[str, list[int]]]:
    cache_dit = quiet_cache_dit()
    masks = [(policy, list(cache_dit.steps_mask(total_steps=n, mask_policy=policy))) for policy in MASK_POLICIES]
    settings = [(i, b) for b in range(1, n) for i in TAYLORSEER_INTERVALS]
    for i, b in nearest_settings(lambda s: taylorseer_fraction(*s, n), settings, targets, limit=MASKS_PER_TARGET):
        masks.append((f"every {i} after {b}", every_k_mask(i, b, n)))
    return masks


def dbcache_points(inputs, name: str) -> list:
    harness, targets = inputs.harness, inputs.targets
    adapter = cache_dit_adapter(harness.pipe)
    points = []

    def search(calibrator, fn, bn, warmup, for_targets, max_probes=5):
        setting = {**calibrator, "Fn": fn, "Bn": bn, "warmup": warmup}
        make = lambda t: dbcache_install(harness, adapter, calibrator, threshold=t, fn=fn, bn=bn,  # noqa: E731
                                         warmup=warmup)
        return threshold_points(harness, name, make, setting, for_targets, axes=("fraction", "compute"),
                                guess=CACHE_DIT_THRESHOLD, max_probes=max_probes)

    for calibrator in CALIBRATORS[name]:
        first = {w: search(calibrator, 1, 0, w, targets) for w in CACHE_DIT_WARMUPS}
        points += [p for found in first.values() for p in found]
        for target in targets:  # the other structures at the warm-up that did best at this target
            near = {w: [p for p in found if abs(p.fraction - target) <= 0.02] for w, found in first.items()}
            scored = {w: min(p.latent_rel_l1 for p in found) for w, found in near.items() if found}
            warmup = min(scored, key=scored.get) if scored else 2
            for fn, bn in CACHE_DIT_STRUCTURES:
                points += search(calibrator, fn, bn, warmup, [target], max_probes=4)
        for label, mask in _masks(harness.steps, targets):
            install = dbcache_install(harness, adapter, calibrator, threshold=0.0, mask=mask)
            points.append(harness.run(name, install, {**calibrator, "Fn": 1, "Bn": 0, "mask": label}))
    return points


ROWS = {
    "cache-dit": peer_row("cache-dit DBCache (best of Fn/Bn, warm-up, static masks)",
                         checked("cache-dit", lambda r: dbcache_points(r, "cache-dit"))),
    "cache-dit-taylorseer": peer_row(
        "cache-dit DBCache + TaylorSeer (orders 1-2; Fn/Bn, warm-up, masks)",
        checked("cache-dit-taylorseer", lambda r: dbcache_points(r, "cache-dit-taylorseer"))),
    "cache-dit-dmd": peer_row("cache-dit DBCache + DMD (Fn/Bn, warm-up, masks)",
                             checked("cache-dit-dmd", lambda r: dbcache_points(r, "cache-dit-dmd"))),
    "cache-dit-foca": peer_row("cache-dit DBCache + FoCa (Fn/Bn, warm-up, masks)",
                              checked("cache-dit-foca", lambda r: dbcache_points(r, "cache-dit-foca"))),
}
