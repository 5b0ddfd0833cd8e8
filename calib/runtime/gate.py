"""TeaCache's decision rule, free of torch so the offline replay (``calib tune``) runs the very same code.

Per stream: the first and the last step always compute. Otherwise the rescaled indicator change is added to an
accumulator; while the accumulator stays under the threshold the step is skipped, else it computes and the
accumulator is reset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass
class Rescaler:
    """poly(x) with coefficients highest degree first (numpy.poly1d order), inputs clamped to the fitted domain."""

    coefficients: Sequence[float]
    domain: tuple[float, float] | None = None

    def __call__(self, x: float) -> float:
        if self.domain is not None:
            # Outside the points it was fitted on a polynomial can turn negative or blow up; never extrapolate.
            x = min(max(x, self.domain[0]), self.domain[1])
        y = 0.0
        for c in self.coefficients:
            y = y * x + c
        # A change is never negative: a negative prediction would let the accumulator run backwards.
        return max(y, 0.0)


class TeaCacheGate:
    """Accumulate rescaled indicator changes; say whether the current step must compute."""

    def __init__(self, rescaler: Rescaler, threshold: float):
        self.rescaler = rescaler
        self.threshold = float(threshold)
        self.accumulated = 0.0

    def reset(self) -> None:
        self.accumulated = 0.0

    def should_compute(self, change: float | None, *, force: bool = False, scale: float | None = None) -> bool:
        """``change`` is the indicator's rel-L1 change against the previous step (None when there is none).

        ``scale``: for coefficients fitted on a normalised indicator (``delta_sigma``), the step's change in noise
        level Δσ; the accumulator then grows by ``Δσ * p(change / Δσ)``. A scale that is not a positive finite
        number makes the step compute."""
        if force or change is None or self.threshold <= 0.0 or not math.isfinite(change):
            self.accumulated = 0.0
            return True
        if scale is None:
            self.accumulated += self.rescaler(change)
        elif math.isfinite(scale) and scale > 0.0:
            self.accumulated += scale * self.rescaler(change / scale)
        else:
            self.accumulated = 0.0
            return True
        if self.accumulated < self.threshold:
            return False
        self.accumulated = 0.0
        return True


def replay(changes: Sequence[float], rescaler: Rescaler, threshold: float,
           scales: Sequence[float] | None = None, *, last_forced: bool = True) -> list[bool]:
    """Offline: the compute/skip decisions the runtime would take on one stream's per-step indicator changes
    (entry 0 has no previous step). The first step always computes, and so does the last when it is the
    generation's last step (``last_forced``; not so for the high-noise expert of a two-expert model, whose last step
    the runtime gates like any other). ``scales``: per-step Δσ for coefficients fitted on the ``delta_sigma``
    indicator (None: not normalised)."""
    gate = TeaCacheGate(rescaler, threshold)
    n = len(changes)
    out = []
    for i, change in enumerate(changes):
        first_or_last = i == 0 or (last_forced and i == n - 1)
        scale = None if scales is None or i == 0 else float(scales[i])
        out.append(gate.should_compute(None if i == 0 else float(change), force=first_or_last, scale=scale))
    return out
