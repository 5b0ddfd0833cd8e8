"""Block Caching's ``calib fit`` options (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass

from calib.methods.base import MethodOptions, names, number, option

DEFAULT_TARGET_FRACTION = 0.6


@dataclass(frozen=True)
class BlockCacheOptions(MethodOptions):
    target_fraction: float = option(DEFAULT_TARGET_FRACTION, "recommend the smallest threshold computing at most this "
                                    "fraction of block evaluations", parse=number(low=0, high=1, low_open=True))
    streams: tuple[str, ...] | None = option(None, "use only these streams (e.g. --stream cond); default all",
                                             flag="--stream", kind="multiple", parse=names)
    plot: bool = option(True, "do not write the heat-map PNG beside the JSON", flag="--no-plot")

    @property
    def figure(self) -> bool:
        return self.plot
