"""The peers calib is measured against on the frontier (:mod:`calib.evaluate.frontier`), one module per family,
each given its best: every setting its library or paper recommends and a sweep around it, bisected over real runs
to each target where it has a threshold. Each module's docstring says what its authors recommend and what is swept.

* :mod:`.uniform` — every k-th step computed (calib's gate counting steps);
* :mod:`.taylorseer` — diffusers' TaylorSeer (orders 1-3, lite and full mode, every interval and warm-up);
* :mod:`.seacache` — diffusers' SeaCache (spectral-evolution-aware gate);
* :mod:`.spectrum` — Spectrum (Chebyshev ridge forecast of the final hidden state), implemented from the paper;
* :mod:`.easycache` — EasyCache (reused transformation v - x with an online rate test), implemented from the paper;
* :mod:`.diffusers_cfg` — diffusers' Pyramid Attention Broadcast and FasterCache (partial: compute share only);
* :mod:`.cache_dit` — cache-dit's DBCache without and with each calibrator (TaylorSeer, DMD, FoCa).

`PEER_ROWS` maps each row's name to its :class:`~calib.methods.base.FrontierRow`, in the order the frontier runs them
(cache-dit last: its ``disable_cache`` leaves a FLUX transformer's blocks patched). A peer that cannot run on a model
raises; the frontier reports why in its ``not_applicable``."""

from __future__ import annotations

from calib.methods.base import FrontierRow
from calib.evaluate.peers import cache_dit, diffusers_cfg, easycache, seacache, spectrum, taylorseer, uniform
from calib.evaluate.peers.common import diffusers_install, unrestored

PEER_ROWS: dict[str, FrontierRow] = {
    **uniform.ROWS,
    **taylorseer.ROWS,
    **seacache.ROWS,
    **spectrum.ROWS,
    **easycache.ROWS,
    **diffusers_cfg.ROWS,
    **cache_dit.ROWS,
}

__all__ = ["PEER_ROWS", "diffusers_install", "unrestored"]
