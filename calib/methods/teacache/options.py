"""TeaCache's ``calib fit`` options (standard library only: ``calib fit --help`` reads them without numpy)."""

from __future__ import annotations

from dataclasses import dataclass

from calib._io import MAX_RESAMPLES
from calib.methods.base import MethodOptions, OptionError, names, number, option
from calib.methods.quality import DEFAULT_MAX_ERROR, MAX_ERROR_HELP

MIN_DEGREE, MAX_DEGREE = 1, 9
# What x can be (calib.methods.teacache.rescalers.INDICATOR_SERIES says which traced series each one is) and how it
# can be normalised.
INDICATORS = ("modulated_input", "block_input", "temb")
NORMALIZATIONS = ("none", "delta_sigma")
FORECAST_ORDERS = (0, 1, 2)
FORECAST_VARIABLES = ("step", "sigma")  # the schedule fit also measures "timestep"


def parse_degree(value, flag):
    """``auto`` or an integer from 1 to 9."""
    if value == "auto":
        return "auto"
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        degree = int(value)
    except (TypeError, ValueError):
        raise OptionError(f"{flag} {value!r}: expected auto or an integer from {MIN_DEGREE} to {MAX_DEGREE}") from None
    if not MIN_DEGREE <= degree <= MAX_DEGREE:
        raise OptionError(f"degree must be an integer from {MIN_DEGREE} to {MAX_DEGREE}, got {degree}")
    return degree


def parse_forecast_order(value, flag):
    """``auto`` (None: chosen by held-out error) or a Newton order 0-2."""
    if value is None or value == "auto":
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        order = int(value)
    except (TypeError, ValueError):
        order = None
    if order not in FORECAST_ORDERS or str(value).strip() not in {str(o) for o in FORECAST_ORDERS}:
        raise OptionError(f"{flag} {value!r}: choose auto, 0, 1 or 2")
    return order


def parse_forecast_variable(value, flag):
    """``auto`` (None: chosen by held-out error), ``step`` or ``sigma``."""
    if value is None or value == "auto":
        return None
    if value == "timestep":
        raise OptionError(f"{flag} timestep is for --method schedule; the teacache fit picks step or sigma")
    if value not in FORECAST_VARIABLES:
        raise OptionError(f"{flag} {value!r}: choose auto, step or sigma")
    return value


@dataclass(frozen=True)
class TeacacheOptions(MethodOptions):
    degree: int | str = option("auto", "polynomial degree: auto (the held-out error chooses among 1-6) or N (1-9) "
                               "to force it", metavar="auto|N", parse=parse_degree)
    robust: bool = option(False, "fit with the Huber loss (outlying steps weigh less) instead of least squares")
    indicator: str = option("auto", "what x is; auto ranks the traced candidates by held-out error",
                            choices=("auto", *INDICATORS))
    normalization: str = option("auto", "delta_sigma divides changes by the step's change in noise level (for "
                                "several step counts)", choices=("auto", *NORMALIZATIONS))
    bootstrap: int = option(200, "resamples of the generations for the confidence band (0: none)",
                            parse=number(int, low=0, high=MAX_RESAMPLES))
    allow_mixed: bool = option(False, "fit traces of different steps/guidance/resolution together")
    streams: tuple[str, ...] | None = option(None, "use only these streams (e.g. --stream cond); default all",
                                             flag="--stream", kind="multiple", parse=names)
    plot: bool = option(True, "do not write the PNG beside the JSON", flag="--no-plot")
    forecast: int | None = option("auto", "what skipped steps add: 0 reuses the cached residual, 1/2 extrapolate it "
                                  "(Newton order); auto picks by held-out error (needs traces with forecast errors, "
                                  "else 0)", choices=("auto", "0", "1", "2"), parse=parse_forecast_order,
                                  shown_default="auto")
    forecast_variable: str | None = option("auto", "extrapolate in the step index or in sigma; auto picks by "
                                           "held-out error", choices=("auto", "step", "sigma"),
                                           parse=parse_forecast_variable, shown_default="auto")
    max_error: float = option(DEFAULT_MAX_ERROR, MAX_ERROR_HELP + " (predicted on the traces)",
                              parse=number(low=0))

    @property
    def figure(self) -> bool:
        return self.plot
