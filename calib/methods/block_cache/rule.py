"""Block Caching's rule on the traced per-block changes: the block mask of a threshold, its compute fraction, the
threshold for a target fraction (the module docstring of :mod:`calib.methods.block_cache.method` derives it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from calib.errors import CalibError
from calib.methods.search import bisect, first_row
from calib.runtime.policies import block_schedule

RULE = (
    "per block: add the block's mean rel-L1 output change at each step to its accumulator; compute (and reset "
    "the accumulator) when it exceeds the threshold, otherwise reuse the residual cached at its last computation; "
    "the first and the last step always compute"
)


def block_mask(changes, threshold: float) -> np.ndarray:
    """Boolean (n_steps, n_blocks): True where the block computes. ``changes[0]`` (no previous step) is ignored.
    The runtime's own rule (:func:`calib.runtime.policies.block_schedule`), so what is tuned is what runs."""
    c = np.asarray(changes, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"changes must be (n_steps, n_blocks), got shape {c.shape}")
    return np.asarray(block_schedule(c.tolist(), float(threshold)), dtype=bool).reshape(c.shape)


def compute_fraction(changes, threshold: float) -> float:
    return float(block_mask(changes, threshold).mean())


@dataclass
class TuneRow:
    threshold: float
    compute_fraction: float

    @property
    def predicted_speedup(self) -> float:
        return 1.0 / self.compute_fraction if self.compute_fraction > 0 else math.inf

    def as_dict(self) -> dict:
        return {
            "threshold": float(self.threshold),
            "compute_fraction": round(float(self.compute_fraction), 6),
            "predicted_speedup": round(float(self.predicted_speedup), 4),
        }


def threshold_grid(changes_list) -> np.ndarray:
    """Thresholds that span the data: 0, then geometric from the smallest step change to the largest sum."""
    finite = np.concatenate([np.asarray(c, dtype=np.float64)[1:].ravel() for c in changes_list])
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if finite.size == 0:
        return np.array([0.0])
    lo = float(np.min(finite))
    hi = float(max(np.nansum(np.asarray(c, dtype=np.float64)[1:], axis=0).max() for c in changes_list))
    grid = np.geomspace(lo * 0.5, max(hi, lo) * 1.05, 60)
    return np.concatenate([[0.0], np.unique(np.round(grid, 6))])


def table(changes_by_component: dict, grid=None) -> list[TuneRow]:
    """Compute fraction over all components' blocks for each threshold."""
    mats = list(changes_by_component.values())
    grid = threshold_grid(mats) if grid is None else grid
    rows = []
    for t in grid:
        computed = sum(int(block_mask(c, float(t)).sum()) for c in mats)
        total = sum(int(np.asarray(c).size) for c in mats)
        rows.append(TuneRow(float(t), computed / total))
    return rows


def choose_threshold(changes_by_component: dict, target_fraction: float, grid=None):
    """(chosen row, table): the smallest threshold whose fraction of block computations is <= ``target_fraction``.

    The fraction only falls as the threshold grows (each block's k-th recomputation can only move later), so the
    first row of the sorted grid that meets the target is the least aggressive mask that does; between grid
    points a bisection refines it."""
    if not 0 < target_fraction <= 1:
        raise CalibError(f"--target-fraction must be in (0, 1], got {target_fraction}")
    rows = sorted(table(changes_by_component, grid), key=lambda r: r.threshold)
    chosen = first_row(rows, lambda r: r.compute_fraction <= target_fraction, lambda: rows[-1])
    i = rows.index(chosen)
    if i > 0 and chosen.compute_fraction <= target_fraction:
        lo, hi = bisect(lambda t: table(changes_by_component, [t])[0].compute_fraction <= target_fraction,
                        rows[i - 1].threshold, chosen.threshold, 30)
        chosen = table(changes_by_component, [round(hi, 8)])[0]
        if chosen.compute_fraction > target_fraction:  # rounding stepped back over the edge
            chosen = table(changes_by_component, [hi])[0]
        rows.append(chosen)
        rows.sort(key=lambda r: r.threshold)
    return chosen, rows
