"""``apply()``'s keywords: what every method takes (:class:`CommonOptions`) and the checks each method's own options
dataclass runs in ``__post_init__``, so a bad argument is one line before any hook is installed.

Every check raises a documented :class:`~calib.errors.CalibError`: :class:`OptionError` (also a TypeError) for a
value of the wrong type, :class:`OptionValueError` (also a ValueError) for one out of range, ``ThresholdError`` for a
threshold, ``ForecastError`` from a forecast setting itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import OptionError, OptionValueError, ThresholdError
from .forecast import ForecastSpec


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_threshold(threshold) -> float:
    """A threshold as a float, or a ThresholdError saying why not (not a number, not finite, negative)."""
    if isinstance(threshold, bool):
        raise ThresholdError(f"threshold must be a number, got {threshold!r}")
    try:
        value = float(threshold)
    except OverflowError:  # an int too large for a float (10**400)
        raise ThresholdError(f"threshold must be a finite number, got an integer of {len(str(abs(threshold)))} "
                             "digits") from None
    except (TypeError, ValueError):
        raise ThresholdError(f"threshold must be a number, got {threshold!r}") from None
    if not math.isfinite(value):
        raise ThresholdError(f"threshold must be a finite number, got {threshold!r}")
    if value < 0:
        raise ThresholdError(f"threshold must be >= 0, got {value}")
    return value


def check_count(name: str, value) -> None:
    """``value`` is None or an integer >= 1 (``num_steps``, ``budget``)."""
    if value is None:
        return
    if not is_int(value):
        raise OptionError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise OptionValueError(f"{name} must be an integer >= 1, got {value}")


def is_budget(value) -> bool:
    """A schedule's budget: full forwards per generation, a positive multiple of one half (a cond-only step of
    batched guidance costs half a forward)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return value >= 0.5 and float(2 * value).is_integer()
    except (OverflowError, ValueError):
        return False


def check_budget(value) -> None:
    if value is not None and not is_budget(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"budget must be a number of full forwards (e.g. 15 or 7.5), got {value!r}")
        raise OptionValueError(f"budget must be a positive multiple of 0.5 full forwards, got {value!r}")


def check_forecast(forecast) -> None:
    if forecast is not None and not isinstance(forecast, ForecastSpec):
        raise OptionError(
            f"forecast must be a calib.runtime.Forecast (e.g. Forecast(order=1, variable='sigma')), got "
            f"{type(forecast).__name__} {forecast!r}"[:300])


def as_sigmas(sigmas) -> tuple[float, ...] | None:
    """The noise levels given for a bare transformer (``scheduler.sigmas`` after ``set_timesteps``: a tensor or a
    sequence of numbers) as floats, read once; OptionError / OptionValueError otherwise."""
    if sigmas is None:
        return None
    if isinstance(sigmas, torch.Tensor):
        if not (sigmas.is_floating_point() or sigmas.dtype in (torch.int32, torch.int64)):
            raise OptionError(f"sigmas must hold real numbers, got a tensor of {sigmas.dtype}")
        values = [float(v) for v in sigmas.detach().float().cpu().reshape(-1).tolist()]
    elif isinstance(sigmas, (str, bytes, dict)) or not hasattr(sigmas, "__iter__"):
        raise OptionError(f"sigmas must be the scheduler's noise levels (scheduler.sigmas: a tensor or a list of "
                          f"numbers), got {type(sigmas).__name__}")
    else:
        entries = list(sigmas)
        bad = next((v for v in entries if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if bad is not None:
            raise OptionError(f"sigmas must be numbers, got {bad!r}"[:200])
        try:
            values = [float(v) for v in entries]
        except OverflowError:
            raise OptionValueError("sigmas must be finite numbers, got an integer beyond float's range") from None
    if not values:
        raise OptionValueError("sigmas is empty: expected the scheduler's noise levels, one per step and the final one")
    if not all(math.isfinite(v) for v in values):
        raise OptionValueError(f"sigmas must be finite numbers, got {next(v for v in values if not math.isfinite(v))}")
    return tuple(values)


@dataclass(frozen=True)
class CommonOptions:
    """What ``apply()`` takes for every method. ``num_steps``: a bare transformer's steps per generation (a pipeline's
    scheduler says it); ``allow_model_mismatch``: apply a file calibrated for another model class (with a warning);
    ``modulation_module``: the dotted path of the layer to hook in a class calib has no adapter for; ``strict``: a
    mismatch with the file's validity signature raises ``SignatureMismatchError`` instead of warning."""

    num_steps: int | None = None
    allow_model_mismatch: bool = False
    modulation_module: str | None = None
    strict: bool = False

    def __post_init__(self):
        check_count("num_steps", self.num_steps)
        if not isinstance(self.allow_model_mismatch, bool):
            raise OptionError(f"allow_model_mismatch must be True or False, got {self.allow_model_mismatch!r}")
        if not isinstance(self.strict, bool):
            raise OptionError(f"strict must be True or False, got {self.strict!r}")
        if self.modulation_module is not None and not (
                isinstance(self.modulation_module, str) and self.modulation_module):
            raise OptionError(f"modulation_module must be a dotted module path such as 'transformer_blocks.0.norm1', "
                              f"got {self.modulation_module!r}")
