"""diffusers' Pyramid Attention Broadcast (``PyramidAttentionBroadcastConfig``, arXiv 2408.12588) and FasterCache
(``FasterCacheConfig``, arXiv 2410.19355): caches that never skip a whole forward (attention outputs, or the
unconditional half of a CFG batch, are reused), so both are matched on the compute share.

* PAB: the library recommends ``spatial_attention_block_skip_range=2`` over the timestep range (100, 800); swept:
  skip ranges 2, 3, 4 over the whole range (the built-in models' 30 steps leave little outside (100, 800)).
* FasterCache: the fields of ``calib export --format diffusers-fastercache`` (the CFG cache calibrated from the
  traced cond - uncond change), one point per CFG tolerance (0.5-8x the median change). It needs an image-shaped
  output (BCHW / BCFHW): on packed-token models (FLUX, the built-in image model) it is reported as not applicable.
"""

from __future__ import annotations

import numpy as np

from calib.errors import CalibError
from calib.evaluate.peers.common import peer_row, diffusers_install
from calib.exports.diffusers import fastercache_config, fastercache_warnings
from calib.methods.fastercache_cfg.method import build_document, cfg_series

PAB_SKIP_RANGES = (2, 3, 4)
FASTERCACHE_TOLERANCES = (0.5, 1.0, 2.0, 4.0, 8.0)  # x the median traced cond - uncond change


def _timestep_callback(scheduler):
    def current_timestep():
        index = getattr(scheduler, "step_index", None) or 0
        return float(scheduler.timesteps[min(index, len(scheduler.timesteps) - 1)])

    return current_timestep


def pab_points(inputs) -> list:
    from diffusers import PyramidAttentionBroadcastConfig

    harness = inputs.harness
    current_timestep = _timestep_callback(harness.pipe.scheduler)
    points = []
    for skip in PAB_SKIP_RANGES:
        cfg = lambda s=skip: PyramidAttentionBroadcastConfig(  # noqa: E731
            spatial_attention_block_skip_range=s, spatial_attention_timestep_skip_range=(0, 1000),
            current_timestep_callback=current_timestep)
        points.append(harness.run("pab", diffusers_install(harness.transformer, cfg),
                                  {"spatial_attention_block_skip_range": skip}))
    return points


def fastercache_points(inputs) -> list:
    """diffusers' FasterCache with the fields calib derives from the traces, one point per CFG tolerance."""
    from diffusers import FasterCacheConfig

    harness, trace_set = inputs.harness, inputs.trace_set
    if trace_set is None:
        raise CalibError("needs traces (its fields are derived from the traced cond - uncond change)")
    c, _, _ = cfg_series(trace_set)
    finite = c[1:][np.isfinite(c[1:])]
    if finite.size == 0:
        raise CalibError("the traces hold no cond - uncond changes (CFG off or traced without it)")
    current_timestep = _timestep_callback(harness.pipe.scheduler)
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


ROWS = {
    "pab": peer_row("diffusers PyramidAttentionBroadcast", pab_points, partial=True),
    "fastercache": peer_row("diffusers FasterCache (fields from traces)", fastercache_points, partial=True),
}
