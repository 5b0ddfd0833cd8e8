"""Replay the runtime's decision rule on traces: which threshold skips how much.

The replay runs :func:`calib.runtime.gate.replay`, the runtime's own gate, on each traced stream's indicator
changes, so the predicted fraction of full forwards is what the runtime will do on those trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .runtime.gate import Rescaler, replay

DEFAULT_GRID = tuple(np.round(np.concatenate([np.arange(0.01, 0.1, 0.01), np.arange(0.1, 1.01, 0.05)]), 4))
# Recommend the smallest threshold that computes at most this fraction of steps (~1.6x fewer forwards):
# the paper's "slow" FLUX setting sits there, and on the built-in models the output error stays small.
RECOMMENDED_COMPUTE_FRACTION = 0.6


@dataclass
class ThresholdRow:
    threshold: float
    compute_fraction: float

    @property
    def predicted_speedup(self) -> float:
        return 1.0 / self.compute_fraction if self.compute_fraction > 0 else float("inf")

    def as_dict(self) -> dict:
        return {
            "threshold": float(self.threshold),
            "compute_fraction": round(float(self.compute_fraction), 6),
            "predicted_speedup": round(float(self.predicted_speedup), 4),
        }


def compute_fraction(trace_set, rescalers: dict[str, Rescaler], threshold: float) -> float:
    """Fraction of steps that compute, over every traced trajectory of the components that have a rescaler."""
    computed = total = 0
    for traj in trace_set.trajectories:
        rescaler = rescalers.get(traj.component)
        if rescaler is None:
            continue
        changes = np.asarray(traj.input_rel_l1, dtype=np.float64)
        decisions = replay(changes.tolist(), rescaler, threshold)
        computed += sum(decisions)
        total += len(decisions)
    if total == 0:
        raise ValueError("no trajectories to replay")
    return computed / total


def threshold_table(trace_set, rescalers: dict[str, Rescaler], grid=DEFAULT_GRID) -> list[ThresholdRow]:
    return [ThresholdRow(float(t), compute_fraction(trace_set, rescalers, float(t))) for t in grid]


def recommend(table: list[ThresholdRow], target_fraction: float = RECOMMENDED_COMPUTE_FRACTION) -> ThresholdRow:
    """The smallest threshold whose replayed compute fraction is at most ``target_fraction`` (else the largest)."""
    for row in sorted(table, key=lambda r: r.threshold):
        if row.compute_fraction <= target_fraction:
            return row
    return max(table, key=lambda r: r.threshold)


def thresholds_section(table: list[ThresholdRow], chosen: ThresholdRow, target_fraction: float) -> dict:
    return {
        "recommended": float(chosen.threshold),
        "criterion": f"smallest threshold with replayed compute fraction <= {target_fraction}",
        "table": [row.as_dict() for row in table],
    }
