"""diffusers' TaylorSeer (``TaylorSeerCacheConfig``, arXiv 2503.06923), given its best.

What the library and the paper recommend: ``cache_interval`` 5, ``disable_cache_before_step`` 3 (the warm-up),
``max_order`` 1 (the library's defaults); the paper's FLUX settings use intervals 3-6 and orders 1-2, with order up
to 4 in its ablation. Lite mode (``use_lite_mode``) skips every block and extrapolates the output projection's
output; full mode extrapolates every attention module and computes the rest (the MLPs still run, so its compute
share is far above its fraction of full forwards).

Swept: orders 1, 2 and 3; lite and full mode; float32 Taylor factors (the default bfloat16 only loses accuracy
here); every interval 2-6, each with **every** warm-up whose fraction of full forwards is the one nearest each
target that any (interval, warm-up) reaches (:func:`taylorseer_settings`). The schedule is static, so each
setting's fraction is known before it runs."""

from __future__ import annotations

import torch

from calib.evaluate.harness import REACHED
from calib.evaluate.peers.common import peer_row, diffusers_install

TAYLORSEER_INTERVALS = (2, 3, 4, 5, 6)
TAYLORSEER_ORDERS = (1, 2, 3)
TAYLORSEER_MODES = (True, False)  # use_lite_mode


def taylorseer_fraction(interval: int, before: int, n: int) -> float:
    """The fraction of ``n`` steps diffusers' TaylorSeer computes: every step before ``before``, then every
    ``interval``-th (the first right after the warm-up)."""
    return sum(1 for s in range(n) if s < before or (s - before - 1) % interval == 0) / n


def taylorseer_settings(n: int, targets) -> list[tuple[int, int]]:
    """Every (cache_interval, disable_cache_before_step) whose fraction of full forwards is the one nearest each
    target that any setting reaches: TaylorSeer's best at that target is among them."""
    table = {(i, b): taylorseer_fraction(i, b, n) for i in TAYLORSEER_INTERVALS for b in range(1, n)}
    settings = set()
    for target in targets:
        nearest = min(abs(f - target) for f in table.values())
        if nearest > REACHED:
            continue
        settings.update(s for s, f in table.items() if abs(abs(f - target) - nearest) < 1e-9)
    return sorted(settings)


def taylorseer_points(inputs) -> list:
    from diffusers import TaylorSeerCacheConfig

    harness = inputs.harness
    points = []
    for interval, before in taylorseer_settings(harness.steps, inputs.targets):
        for order in TAYLORSEER_ORDERS:
            for lite in TAYLORSEER_MODES:
                cfg = lambda i=interval, b=before, o=order, m=lite: TaylorSeerCacheConfig(  # noqa: E731
                    cache_interval=i, disable_cache_before_step=b, max_order=o, taylor_factors_dtype=torch.float32,
                    use_lite_mode=m)
                points.append(harness.run("taylorseer", diffusers_install(harness.transformer, cfg),
                                          {"cache_interval": interval, "disable_cache_before_step": before,
                                           "max_order": order, "mode": "lite" if lite else "full"}))
    return points


ROWS = {"taylorseer": peer_row("diffusers TaylorSeer (best of orders 1-3, lite/full, interval, warm-up)",
                              taylorseer_points)}
