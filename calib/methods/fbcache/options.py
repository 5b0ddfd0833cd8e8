"""First Block Cache's fit options: ``calib export --format diffusers-fbcache``'s, which fits it (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass

from calib.methods.base import MethodOptions, number, option

DEFAULT_TARGET_SPEEDUP = 1.6  # ~60 % of steps computed, the TeaCache fit's recommendation criterion


@dataclass(frozen=True)
class FbcacheOptions(MethodOptions):
    target_speedup: float = option(DEFAULT_TARGET_SPEEDUP, "pick the threshold that computes at most 1/this of the "
                                   "steps", parse=number(low=1, what=" (a speed-up in full forwards)"))
    threshold: float | None = option(None, "this threshold instead of the one for --target-speedup", kind="float",
                                     parse=number(low=0, optional=True))
    component: str = option("transformer", "which component's values")
