"""What a policy answers for one step of one stream (or one block of it): a small frozen :class:`Decision`, torch-free
so the offline replay (``calib tune``) builds the same objects as the hooks.

``forced`` tells a computation the policy could not avoid (the first or last step, nothing cached to forecast from,
no previous indicator to compare with) from one its rule chose (the gate's accumulator reached the threshold, the
step is listed in the mask); ``handle.stats()`` counts them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

# Computations the policy could not avoid.
FIRST_STEP = "first step"
LAST_STEP = "last step"
NOTHING_CACHED = "nothing cached to forecast from"  # no history in this stream yet, or its shape changed
NO_PREVIOUS_INDICATOR = "no previous indicator to compare with"
NO_NOISE_CHANGE = "no noise-level change for this step"  # delta_sigma coefficients and no positive finite dsigma
CHANGE_NOT_FINITE = "indicator change not finite"
BEYOND_SCHEDULE = "step beyond the schedule"
FORCED = "forced"  # a caller of TeaCacheGate.should_compute(force=True) that gave no reason

# What a rule chose.
THRESHOLD_ZERO = "threshold 0"
OVER_THRESHOLD = "accumulated change reached the threshold"
UNDER_THRESHOLD = "accumulated change under the threshold"
LISTED = "listed in the mask"
LISTED_COND_ONLY = "listed as cond-only: the conditional branch computes, the unconditional one is forecast"
NOT_LISTED = "not listed in the mask"


@dataclass(frozen=True)
class Decision:
    """``compute``: whether the step (or block) runs; ``reason``: why, one of this module's constants;
    ``forced``: a computation the policy could not avoid, as opposed to one its rule chose; ``change`` and
    ``accumulated``: the gate's indicator change (rescaled, as added) and its accumulator after this step, where a
    gate measured them."""

    compute: bool
    reason: str
    forced: bool = False
    change: float | None = None
    accumulated: float | None = None
    part: str | None = None  # a computed step that runs only this part of the call (``cond``: its CFG branch)

    @classmethod
    def force(cls, reason: str) -> "Decision":
        return cls(True, reason, forced=True)
