"""TeaCache's decision rule, free of torch so the offline replay (``calib tune``) runs the very same code.

Per stream: the first and the last step always compute. Otherwise the rescaled indicator change is added to an
accumulator; while the accumulator stays under the threshold the step is skipped, else it computes and the
accumulator is reset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .decision import (CHANGE_NOT_FINITE, FORCED, NO_NOISE_CHANGE, NO_PREVIOUS_INDICATOR, OVER_THRESHOLD,
                       THRESHOLD_ZERO, UNDER_THRESHOLD, Decision)


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
        return self._advance(change, FORCED if force else None, scale)[0]

    def decide(self, change: float | None, *, forced: str | None = None, scale: float | None = None) -> Decision:
        """:meth:`should_compute` with its reason: ``forced`` names why the step must compute whatever the
        accumulator says (the first or last step, nothing cached), None when the rule decides."""
        compute, reason, added = self._advance(change, forced, scale)
        if reason is forced or reason in _FORCED_BY_RULE:
            return Decision.force(reason)
        return Decision(compute, reason, change=added, accumulated=self.accumulated if added is not None else None)

    def _advance(self, change, forced, scale) -> tuple[bool, str, float | None]:
        """(compute, reason, what was added to the accumulator): the rule, as tuples (the replay runs it for every
        step of every trajectory at every threshold it tries)."""
        if forced is not None:
            self.accumulated = 0.0
            return True, forced, None
        if self.threshold <= 0.0:
            self.accumulated = 0.0
            return True, THRESHOLD_ZERO, None
        if change is None:
            self.accumulated = 0.0
            return True, NO_PREVIOUS_INDICATOR, None
        if not math.isfinite(change):
            self.accumulated = 0.0
            return True, CHANGE_NOT_FINITE, None
        if scale is None:
            added = self.rescaler(change)
        elif math.isfinite(scale) and scale > 0.0:
            added = scale * self.rescaler(change / scale)
        else:
            self.accumulated = 0.0
            return True, NO_NOISE_CHANGE, None
        self.accumulated += added
        if self.accumulated < self.threshold:
            return False, UNDER_THRESHOLD, added
        self.accumulated = 0.0
        return True, OVER_THRESHOLD, added


_FORCED_BY_RULE = frozenset((NO_PREVIOUS_INDICATOR, CHANGE_NOT_FINITE, NO_NOISE_CHANGE))


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
