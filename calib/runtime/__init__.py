"""calib's runtime cache: load a coefficient JSON, apply it, read the stats. Imports torch and the standard library
only (diffusers is used when present).

    import calib.runtime as cr
    config = cr.load("coeffs/digits.json")
    handle = cr.apply(pipe, config, threshold=0.3)
    image = pipe("a handwritten 7").images[0]
    print(handle.stats())
    handle.remove()

A skipped step adds the cached stack residual, or its forecast (``Forecast(order=1|2, variable=...)``, from the file
or ``apply(..., forecast=...)``). A schedule file (``method: schedule``) or ``apply_schedule(pipe, {component:
[steps]}, steps=N)`` fixes the computed steps instead of the gate.
"""

from .api import CacheHandle, apply, apply_schedule
from .block_cache import BlockCacheConfig, BlockCacheHandle
from .coefficients import CacheConfig, ComponentRescaler, document_for
from .loading import load, parse
from .errors import (CoefficientFileError, ForecastError, ModelMismatchError, ScheduleError, StepCountError,
                     ThresholdError)
from .forecast import Forecast, ForecastHistory
from .gate import Rescaler, TeaCacheGate, replay
from .schedule import Schedule, ScheduleConfig, schedule_document_for

__all__ = [
    "BlockCacheConfig",
    "BlockCacheHandle",
    "CacheConfig",
    "CacheHandle",
    "CoefficientFileError",
    "ComponentRescaler",
    "Forecast",
    "ForecastError",
    "ForecastHistory",
    "ModelMismatchError",
    "Rescaler",
    "Schedule",
    "ScheduleConfig",
    "ScheduleError",
    "StepCountError",
    "TeaCacheGate",
    "ThresholdError",
    "apply",
    "apply_schedule",
    "document_for",
    "load",
    "parse",
    "replay",
    "schedule_document_for",
]
