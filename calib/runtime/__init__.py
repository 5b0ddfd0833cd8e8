"""calib's runtime cache: load a coefficient JSON, apply it, read the stats. Imports torch and the standard library
only (diffusers is used when present).

    import calib.runtime as cr
    config = cr.load("coeffs/digits.json")
    handle = cr.apply(pipe, config, threshold=0.3)
    image = pipe("a handwritten 7").images[0]
    print(handle.stats())
    handle.remove()

Every method (:data:`RUNTIME_METHODS`: ``teacache``, ``schedule``, ``block-cache``) runs on one hook engine
(:mod:`calib.runtime.engine`) as a policy that decides per step (or per block) and stream. A skipped step gets the
forecast of what its target caches (``Forecast(order, variable, target)``, from the file or ``apply(...,
forecast=...)``). A schedule file (``method: schedule``) or ``apply_schedule(pipe, {component: [steps]}, steps=N)``
fixes the computed steps instead of the gate.
"""

from .api import apply, apply_schedule
from .bases import CfgForecast, ChebyshevForecast, LinearForecast, LinearRow
from .decision import Decision
from .errors import (CoefficientFileError, ForecastError, ModelMismatchError, OptionError, OptionValueError,
                     OtherCacheError, ScheduleError, StepCountError, ThresholdError)
from .forecast import Forecast, ForecastHistory, ForecastSpec
from .gate import Rescaler, TeaCacheGate, replay
from .handle import CacheHandle
from .loading import load, parse
from .methods import RUNTIME_METHODS, RuntimeMethod
from .methods.block_cache import BlockCacheConfig, BlockCacheOptions
from .methods.schedule import Schedule, ScheduleConfig, ScheduleOptions, schedule_document_for
from .methods.teacache import ComponentRescaler, TeaCacheConfig, TeaCacheOptions, document_for
from .targets import TARGETS

__all__ = [
    "BlockCacheConfig",
    "BlockCacheOptions",
    "CacheHandle",
    "CfgForecast",
    "ChebyshevForecast",
    "CoefficientFileError",
    "ComponentRescaler",
    "Decision",
    "Forecast",
    "ForecastError",
    "ForecastHistory",
    "ForecastSpec",
    "LinearForecast",
    "LinearRow",
    "ModelMismatchError",
    "OtherCacheError",
    "OptionError",
    "OptionValueError",
    "RUNTIME_METHODS",
    "Rescaler",
    "RuntimeMethod",
    "Schedule",
    "ScheduleConfig",
    "ScheduleError",
    "ScheduleOptions",
    "StepCountError",
    "TARGETS",
    "TeaCacheConfig",
    "TeaCacheGate",
    "TeaCacheOptions",
    "ThresholdError",
    "apply",
    "apply_schedule",
    "document_for",
    "load",
    "parse",
    "replay",
    "schedule_document_for",
]
