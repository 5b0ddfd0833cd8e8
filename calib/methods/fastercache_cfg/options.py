"""FasterCache's CFG cache: its ``calib fit`` options (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass

from calib.methods.base import MethodOptions, number, option


@dataclass(frozen=True)
class FastercacheCfgOptions(MethodOptions):
    cfg_tolerance: float | None = option(None, "allowed accumulated rel-L1 change of the reused cond-uncond "
                                         "difference", parse=number(low=0, optional=True), kind="float",
                                         shown_default="twice its median per-step change")
    plot: bool = option(True, "accepted; this fit draws nothing", flag="--no-plot")
