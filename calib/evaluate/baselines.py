"""The frontier's peers: uniform skipping, diffusers' TaylorSeer, Pyramid Attention Broadcast and FasterCache (with
the fields ``calib export --format diffusers-fastercache`` derives from the traces), and cache-dit (an optional
dependency, imported only here). Each function runs its settings through the :class:`~calib.evaluate.harness.Harness`
and returns the measured points; :data:`calib.evaluate.frontier.ROWS` lists them."""

from __future__ import annotations

import numpy as np
import torch

from calib.errors import CalibError
from calib.evaluate.harness import REACHED, search, runtime_install, with_polynomial
from calib.methods.fastercache_cfg.method import build_document, cfg_series
from calib.exports.diffusers import fastercache_config, fastercache_warnings

FASTERCACHE_TOLERANCES = (0.5, 1.0, 2.0, 4.0, 8.0)  # x the median traced cond - uncond change
CACHE_DIT_WARMUP = 2  # cache-dit's default (8) computes 27 % of 30 steps before caching: the 25 % target needs less


def diffusers_install(transformer, make_config):
    def install():
        transformer.enable_cache(make_config())
        return transformer.disable_cache

    return install


def uniform_points(harness, config, targets):
    cfg = with_polynomial(config, (1.0,))
    points = []
    for k in (2, 3, 4, 5):
        points.append(harness.run("uniform", runtime_install(harness.pipe, cfg, float(k)), {"every": k}))
    return points


def taylorseer_fraction(interval: int, before: int, n: int) -> float:
    return sum(1 for s in range(n) if s < before or (s - before - 1) % interval == 0) / n


TAYLORSEER_INTERVALS = (2, 3, 4, 5, 6)
TAYLORSEER_VARIANTS = ((1, True), (2, True), (1, False), (2, False))  # (max_order, use_lite_mode)


def taylorseer_settings(n: int, targets) -> list[tuple[int, int]]:
    """Every (cache_interval, disable_cache_before_step) whose fraction of full forwards is the one nearest each
    target that any setting reaches (one per interval where it exists): TaylorSeer's best at that target is among
    them."""
    settings = set()
    for target in targets:
        table = {(i, b): taylorseer_fraction(i, b, n) for i in TAYLORSEER_INTERVALS for b in range(1, n)}
        nearest = min(abs(f - target) for f in table.values())
        if nearest > REACHED:
            continue
        for interval in TAYLORSEER_INTERVALS:
            fits = [b for (i, b), f in table.items() if i == interval and abs(abs(f - target) - nearest) < 1e-9]
            if fits:
                settings.add((interval, min(fits)))
    return sorted(settings)


def taylorseer_points(harness, targets):
    """diffusers' TaylorSeer given its best: orders 1 and 2, lite mode (whole blocks skipped, the output projection
    extrapolated) and full mode (every attention module extrapolated, the rest computed), and every interval with
    the warm-up that reaches each target (the full mode's compute share is higher: it still runs the MLPs)."""
    from diffusers import TaylorSeerCacheConfig

    n = harness.steps
    points = []
    for interval, before in taylorseer_settings(n, targets):
        for order, lite in TAYLORSEER_VARIANTS:
            cfg = lambda i=interval, b=before, o=order, m=lite: TaylorSeerCacheConfig(  # noqa: E731
                cache_interval=i, disable_cache_before_step=b, max_order=o, taylor_factors_dtype=torch.float32,
                use_lite_mode=m)
            points.append(harness.run("taylorseer", diffusers_install(harness.transformer, cfg),
                                      {"cache_interval": interval, "disable_cache_before_step": before,
                                       "max_order": order, "mode": "lite" if lite else "full"}))
    return points


def pab_points(harness):
    from diffusers import PyramidAttentionBroadcastConfig

    scheduler = harness.pipe.scheduler

    def current_timestep():
        index = getattr(scheduler, "step_index", None) or 0
        return float(scheduler.timesteps[min(index, len(scheduler.timesteps) - 1)])

    points = []
    for skip in (2, 3, 4):
        cfg = lambda s=skip: PyramidAttentionBroadcastConfig(  # noqa: E731
            spatial_attention_block_skip_range=s, spatial_attention_timestep_skip_range=(0, 1000),
            current_timestep_callback=current_timestep)
        points.append(harness.run("pab", diffusers_install(harness.transformer, cfg),
                                  {"spatial_attention_block_skip_range": skip}))
    return points


def fastercache_points(harness, trace_set):
    """diffusers' FasterCache with the fields calib derives from the traces (``calib export --format
    diffusers-fastercache``), one point per CFG tolerance."""
    from diffusers import FasterCacheConfig

    c, _, _ = cfg_series(trace_set)
    finite = c[1:][np.isfinite(c[1:])]
    if finite.size == 0:
        raise CalibError("the traces hold no cond - uncond changes (CFG off or traced without it)")
    scheduler = harness.pipe.scheduler

    def current_timestep():
        index = getattr(scheduler, "step_index", None) or 0
        return float(scheduler.timesteps[min(index, len(scheduler.timesteps) - 1)])

    points, seen = [], set()
    median = float(np.median(finite))
    for factor in FASTERCACHE_TOLERANCES:
        kwargs, info = fastercache_config(build_document(trace_set, cfg_tolerance=factor * median))
        warnings = fastercache_warnings(info)
        if warnings:
            raise CalibError(warnings[0])
        key = (kwargs["unconditional_batch_skip_range"], tuple(kwargs["unconditional_batch_timestep_skip_range"]),
               kwargs["spatial_attention_block_skip_range"], tuple(kwargs["spatial_attention_timestep_skip_range"]))
        if key in seen:
            continue
        seen.add(key)
        make = lambda kw=kwargs: FasterCacheConfig(**kw, current_timestep_callback=current_timestep)  # noqa: E731
        points.append(harness.run("fastercache", diffusers_install(harness.transformer, make),
                                  {"cfg_tolerance": factor * median,
                                   "unconditional_batch_skip_range": kwargs["unconditional_batch_skip_range"]}))
    return points


def _quiet_cache_dit():
    import logging
    import os

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
    cache_dit = _quiet_cache_dit()
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


def cache_dit_points(harness, targets, *, calibrator: bool):
    """cache-dit's DBCache (first block always computed, no back blocks), with or without its TaylorSeer calibrator
    (order 2), the residual threshold bisected over real runs on both axes: it always pays its first block, so its
    compute share is above its fraction of full forwards."""
    cache_dit = _quiet_cache_dit()
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    adapter = cache_dit_adapter(harness.pipe)
    separate = harness.calls_per_step > 1  # CFG branches as separate transformer calls

    def make(t):
        def install():
            cache_dit.enable_cache(
                adapter,
                cache_config=DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=t,
                                           max_warmup_steps=CACHE_DIT_WARMUP, num_inference_steps=harness.steps,
                                           enable_separate_cfg=separate),
                calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=2) if calibrator else None)
            return lambda: cache_dit.disable_cache(adapter)

        return install

    name = "cache-dit-taylorseer" if calibrator else "cache-dit"
    probes: dict = {}
    for target in targets:
        search(harness, name, make, target, 0.1, probes=probes)
        search(harness, name, make, target, 0.1, key="compute", probes=probes)
    return list(probes.values())


def unrestored(harness) -> str | None:
    """None when an uncached run reproduces the reference again (the method's hooks are all gone), else why not."""
    batch = harness.batches[0]
    try:
        latents, _ = harness.generate_batch(batch)
    except Exception as exc:  # noqa: BLE001
        return f"the model fails after it was removed ({type(exc).__name__})"
    finally:
        harness.meter.take()
    return None if torch.equal(latents, harness.references[batch][0]) else "the model's output changed after it was removed"
