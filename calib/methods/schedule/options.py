"""The schedule fit's ``calib fit`` options, and those it shares with ``auto`` (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass

from calib.methods.base import MethodOptions, OptionError, number, optional_text, option, seeds
from calib.methods.quality import DEFAULT_MAX_ERROR, MAX_ERROR_HELP

DEFAULT_ORDERS = (1, 2)
DEFAULT_VARIABLE = "step"
VARIABLES = ("step", "sigma", "timestep")
DEFAULT_FRACTIONS = (0.5, 1.0 / 3.0, 0.25)
TARGETS = ("output", "hidden", "residual")
DEFAULT_SEARCH_EVALS = 60


def parse_fractions(value, flag):
    """``"0.5,0.333"`` (or numbers) as the fractions of compute searched, each in (0, 1), duplicates dropped."""
    if value is None:
        return DEFAULT_FRACTIONS
    text = ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
    try:
        fractions = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fractions = []
    if not fractions or len(fractions) > 20 or any(not 0 < f < 1 for f in fractions):
        raise OptionError(f"{flag} {text!r}: expected fractions of compute between 0 and 1, comma-separated")
    return tuple(dict.fromkeys(fractions))


def parse_targets(value, flag):
    """``"output,hidden"`` as the forecast targets searched."""
    if value is None:
        return TARGETS
    text = ",".join(value) if isinstance(value, (tuple, list)) else str(value)
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets or any(t not in TARGETS for t in targets):
        raise OptionError(f"{flag} {text!r}: expected targets from {', '.join(TARGETS)}, comma-separated")
    return tuple(dict.fromkeys(targets))


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
    fractions: tuple[float, ...] = option(DEFAULT_FRACTIONS, "the fractions of compute searched (a schedule per "
                                          "fraction)", kind="str", metavar="F[,F]", parse=parse_fractions,
                                          shown_default="0.5,0.333,0.25")
    forecast_order: tuple[int, ...] = option(DEFAULT_ORDERS, "the Newton orders of the forecasts searched",
                                             kind="str", metavar="K[,K]", parse=parse_orders, shown_default="1,2")
    forecast_targets: tuple[str, ...] = option(TARGETS, "what the searched forecasts extrapolate: the transformer's "
                                               "output, the last block's hidden states, the stack residual",
                                               kind="str", metavar="T[,T]", parse=parse_targets,
                                               shown_default="output,hidden,residual")
    forecast_variable: str = option("auto", "what the forecasts extrapolate in (auto: step)",
                                    choices=("auto", *VARIABLES), parse=parse_variable)
    cond_only: bool = option(True, "whole steps only: no step computing just the conditional branch of batched "
                             "guidance (for consumers of a step mask, such as cache-dit)", flag="--no-cond-only")
    search_evals: int = option(DEFAULT_SEARCH_EVALS, "measured generations per local search of a budget",
                               parse=number(int, low=0, high=10_000))
    overwrite: bool = option(False, "measure everything anew instead of resuming from OUT.search.json")
    max_error: float = option(DEFAULT_MAX_ERROR, MAX_ERROR_HELP + " (measured on the held-out prompts)",
                              parse=number(low=0))



@dataclass(frozen=True)
class ScheduleOptions(RegenerationOptions):
    shard: tuple[int, int] | None = option(None, "search only shard I of N of the budgets (a cluster job array); "
                                           "then run once without --shard to write the file", metavar="I/N",
                                           parse=parse_shard)

