"""diffusers' SeaCache (``SeaCacheConfig`` through ``transformer.enable_cache``; arXiv 2602.18993, CVPR 2026).

SeaCache keeps TeaCache's accumulate-and-refresh rule but measures the step-to-step relative L1 change of the
*Spectral-Evolution-Aware*-filtered input latents: a per-frequency Wiener gain for a clean signal with power
``|f|^-power_exp`` at the current noise level sigma, so the distance follows content rather than noise. Below the
threshold the block stack is skipped and the cached residual (order 0) or its linear extrapolation over the last two
full executions (order 1) is added.

What the library recommends (the config's defaults, its docstring): ``threshold`` 0.25, ``residual_order`` 1,
``retention_steps`` 1 and ``cache_end_steps`` 1 (the first and last step always computed), ``max_consecutive_cached``
2, ``power_exp`` 3.0 ("SeaCache uses 3.0 for video features").

Swept here: the threshold bisected over real runs to each target (it skips the whole block stack, so its compute
share is its fraction of full forwards and one axis is searched); ``residual_order`` 0 and 1; ``power_exp`` 3.0 and
2.0 (a natural image's power spectrum falls as ``|f|^-2``); ``max_consecutive_cached`` 2 where that reaches the
target, else the smallest limit that can (3 for 33 %, 5 for 25 % of 30 steps: with 2, at least 40 % of the steps
compute). ``retention_steps`` and ``cache_end_steps`` stay 1.

What the library needs and the built-in pipelines do not give, added here without changing SeaCache's rule:

* the step metadata (``cache_context(name, step_index=, sigma=, num_inference_steps=)``), which diffusers' own Wan
  pipeline passes and the built-in pipelines do not: a pre-hook on the transformer enters that context on every call
  (the step counted from the timestep, sigma from the pipeline's scheduler), one context per CFG stream;
* the raw vision latents of a FLUX transformer (diffusers has adapters for Wan text-to-video and Cosmos 3 only):
  the packed latent tokens placed on their (row, column) grid from ``img_ids``, as ``(C, 1, H, W)``. Wan uses
  diffusers' own adapter.
"""

from __future__ import annotations

import torch

from calib.errors import CalibError
from calib.evaluate.peers.common import (Hooks, peer_row, StepCounter, call_argument, threshold_points,
                                         timestep_of)

SEACACHE_THRESHOLD = 0.25  # the library's default: where the bisection starts
SEACACHE_ORDERS = (1, 0)
SEACACHE_POWERS = (3.0, 2.0)
SEACACHE_MAX_CONSECUTIVE = 2  # the library's default
SEACACHE_RETENTION = 1
SEACACHE_END = 1


def flux_raw_vision(module, args, kwargs) -> list[torch.Tensor] | None:
    """A FLUX transformer's packed latent tokens ``(B, L, C)`` on their ``img_ids`` grid: ``B`` tensors
    ``(C, 1, H, W)`` (what SeaCache filters), None when the call has no image ids."""
    hidden = call_argument(module, "hidden_states", args, kwargs)
    ids = call_argument(module, "img_ids", args, kwargs)
    if not isinstance(hidden, torch.Tensor) or not isinstance(ids, torch.Tensor) or hidden.ndim != 3:
        return None
    ids = ids[0] if ids.ndim == 3 else ids
    rows, cols = ids[:, 1].long(), ids[:, 2].long()
    rows, cols = rows - rows.min(), cols - cols.min()
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    if height * width != hidden.shape[1]:
        return None
    grid = hidden.new_zeros(hidden.shape[0], hidden.shape[2], 1, height, width)
    grid[:, :, 0, rows, cols] = hidden.transpose(1, 2)
    return list(grid.unbind(0))


def _max_consecutive_for(target: float, n: int) -> int:
    """The library's default limit when it can reach ``target`` computed steps of ``n``, else the smallest that
    can (the first ``SEACACHE_RETENTION`` and last ``SEACACHE_END`` steps always compute)."""
    middle = n - SEACACHE_RETENTION - SEACACHE_END
    limit = SEACACHE_MAX_CONSECUTIVE
    while limit < n and (SEACACHE_RETENTION + SEACACHE_END + -(-middle // (limit + 1))) / n > target:
        limit += 1
    return limit


def seacache_install(transformer, scheduler, steps: int, **config):
    """``install() -> undo``: SeaCache on ``transformer`` with the step metadata it needs entered on every call."""
    from diffusers import FluxTransformer2DModel, SeaCacheConfig

    if isinstance(transformer, FluxTransformer2DModel):
        config.setdefault("raw_vision_callback", flux_raw_vision)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:
        raise CalibError(f"{type(scheduler).__name__} has no sigmas: SeaCache's filter needs the noise level")

    def install():
        transformer.enable_cache(SeaCacheConfig(**config))
        hooks = Hooks()
        counter = StepCounter(steps)
        entered = []

        def before(module, args, kwargs):
            step, stream, _ = counter.on_call(timestep_of(module, args, kwargs))
            sigma = float(scheduler.sigmas[min(step, len(scheduler.sigmas) - 1)])
            context = module.cache_context(f"stream{stream}", step_index=step, sigma=sigma, num_inference_steps=steps)
            context.__enter__()
            entered.append(context)

        def after(module, args, kwargs, output):
            while entered:
                entered.pop().__exit__(None, None, None)

        hooks.torch_hook(transformer.register_forward_pre_hook(before, with_kwargs=True))
        hooks.torch_hook(transformer.register_forward_hook(after, with_kwargs=True))

        def undo():
            hooks.remove()
            while entered:
                entered.pop().__exit__(None, None, None)
            transformer.disable_cache()

        return undo

    return install


def seacache_points(inputs) -> list:
    harness = inputs.harness
    n = harness.steps
    points = []
    limits = {}
    for target in inputs.targets:
        limits.setdefault(_max_consecutive_for(target, n), []).append(target)
    for order in SEACACHE_ORDERS:
        for power in SEACACHE_POWERS:
            for limit, targets in limits.items():
                setting = {"residual_order": order, "power_exp": power, "max_consecutive_cached": limit}

                def make(t, s=setting):
                    return seacache_install(harness.transformer, harness.pipe.scheduler, n, threshold=t,
                                            retention_steps=SEACACHE_RETENTION, cache_end_steps=SEACACHE_END, **s)

                points += threshold_points(harness, "seacache", make, setting, targets, guess=SEACACHE_THRESHOLD,
                                           max_probes=5)
    return points


ROWS = {"seacache": peer_row("diffusers SeaCache (best of residual order, power, consecutive limit)",
                            seacache_points)}
