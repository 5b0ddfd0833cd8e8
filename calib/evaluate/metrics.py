"""How far a cached output is from the uncached one: PSNR and SSIM of the decoded output (8-bit scale) through
scikit-image, the relative L1 change of the final latents, and the summary statistics the reports use."""

from __future__ import annotations

import math

import numpy as np
import torch

PSNR_CAP = 100.0  # dB; identical outputs (infinite PSNR) are reported at the cap


def _as_pair(reference, test) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(test, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {out.shape}")
    return ref, out


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (``skimage.metrics.peak_signal_noise_ratio``), capped at :data:`PSNR_CAP`:
    identical inputs, where scikit-image divides by zero, are reported at the cap."""
    from skimage.metrics import peak_signal_noise_ratio

    ref, out = _as_pair(reference, test)
    if not np.any(ref != out):
        return PSNR_CAP
    return float(min(PSNR_CAP, peak_signal_noise_ratio(ref, out, data_range=data_range)))


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0, *, win_size: int = 7,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity (Wang et al. 2004; ``skimage.metrics.structural_similarity`` with its defaults:
    a uniform ``win_size`` x ``win_size`` window, sample covariance, K1 = 0.01, K2 = 0.03) of two 2-D images, or the
    mean over the 2-D planes of ``(..., H, W)`` arrays (frames, channels first). Images smaller than the window use
    the largest odd window that fits (at least 3)."""
    from skimage.metrics import structural_similarity

    ref, out = _as_pair(reference, test)
    if ref.ndim < 2:
        raise ValueError("SSIM needs images of at least 2 dimensions (H, W)")
    h, w = ref.shape[-2:]
    win = min(win_size, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if win < 3:
        raise ValueError(f"images of {h}x{w} are too small for SSIM (a 3x3 window at least)")
    planes = zip(ref.reshape(-1, h, w), out.reshape(-1, h, w))
    return float(np.mean([structural_similarity(a, b, win_size=win, data_range=data_range, K1=k1, K2=k2)
                          for a, b in planes]))


def latent_rel_l1(reference: torch.Tensor, test: torch.Tensor) -> float:
    """``mean|test - reference| / mean|reference|`` (the plain mean difference for an all-zero reference)."""
    ref = reference.detach().double()
    out = test.detach().double()
    denom = float(ref.abs().mean())
    return float((out - ref).abs().mean()) / denom if denom > 0 else float((out - ref).abs().mean())


def spread(values) -> dict:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "min": float(min(vals)),
            "max": float(max(vals)), "n": len(vals)}
