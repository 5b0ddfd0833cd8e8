"""The schedule fit's ``calib fit`` options, and those it shares with ``auto`` (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass

from calib.methods.base import MethodOptions, OptionError, number, optional_text, option, seeds

DEFAULT_GAP = 6
DEFAULT_ORDERS = (1, 2)
DEFAULT_VARIABLE = "step"
VARIABLES = ("step", "sigma", "timestep")


def parse_orders(value, flag):
    """``"1,2"`` (or integers) as the forecast orders measured, each 0, 1 or 2, duplicates dropped."""
    if value is None:
        return DEFAULT_ORDERS
    text = ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
    try:
        orders = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        orders = []
    if not orders or any(o not in (0, 1, 2) for o in orders):
        raise OptionError(f"{flag} {text!r}: expected orders 0, 1 or 2, comma-separated")
    return tuple(dict.fromkeys(orders))


def parse_variable(value, flag):
    """What the measured forecasts extrapolate in; ``auto`` (calib fit's shared default) is the step index."""
    if value in (None, "auto"):
        return DEFAULT_VARIABLE
    if value not in VARIABLES:
        raise OptionError(f"{flag} {value!r}: choose from {', '.join(VARIABLES)}")
    return value


def parse_shard(value, flag):
    """``"I/N"`` -> ``(I, N)``, as calib trace reads it (calib.store.shards.parse_shard)."""
    if value is None or isinstance(value, tuple):
        return value
    from calib.store.shards import parse_shard as parse  # the store imports h5py: not at --help time

    return parse(value)


@dataclass(frozen=True)
class RegenerationOptions(MethodOptions):
    """What a fit that regenerates with the traced model takes: which model, where, which seeds, which forecasts."""

    model: str | None = option(None, "the pipeline to regenerate with (a built-in name, a folder, a hub id or "
                               "module:function)", parse=optional_text,
                               shown_default="the traces' model, when it is a built-in name or an existing folder")
    device: str | None = option(None, "torch device", parse=optional_text,
                                shown_default="cuda if available, else cpu")
    seeds: tuple[int, ...] | None = option(None, "seeds to generate", parse=seeds, shown_default="the traced ones")
    gap: int = option(DEFAULT_GAP, "the longest run of forecast steps + 1 that is measured",
                      parse=number(int, low=2))
    forecast_order: tuple[int, ...] = option(DEFAULT_ORDERS, "the forecast orders measured, the better is kept",
                                             kind="str", metavar="K[,K]", parse=parse_orders, shown_default="1,2")
    forecast_variable: str = option("auto", "what the measured forecasts extrapolate in (auto: step)",
                                    choices=("auto", *VARIABLES), parse=parse_variable)

    @property
    def forecasts(self) -> list:
        """The forecasts measured (:class:`calib.runtime.Forecast`)."""
        from calib.runtime import Forecast  # the runtime imports torch: not at --help time

        return [Forecast(order, self.forecast_variable) for order in self.forecast_order]


@dataclass(frozen=True)
class ScheduleOptions(RegenerationOptions):
    shard: tuple[int, int] | None = option(None, "measure only shard I of N of the segments (a cluster job array); "
                                           "then run once without --shard to search and write", metavar="I/N",
                                           parse=parse_shard)
    overwrite: bool = option(False, "measure every segment anew instead of resuming")
