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

from typing import TYPE_CHECKING

# Imported on first use (PEP 562): `calib export`, `calib fit --help` and the coefficient validator reach
# calib.runtime.document without paying for torch; `import calib.runtime as cr; cr.apply` is unchanged.
_LAZY = {
    "BlockCacheConfig": ".methods.block_cache",
    "BlockCacheOptions": ".methods.block_cache",
    "CacheHandle": ".handle",
    "CfgForecast": ".bases",
    "ChebyshevForecast": ".bases",
    "CoefficientFileError": ".errors",
    "ComponentRescaler": ".methods.teacache",
    "Decision": ".decision",
    "Forecast": ".forecast",
    "ForecastError": ".errors",
    "ForecastHistory": ".forecast",
    "ForecastSpec": ".forecast",
    "LinearForecast": ".bases",
    "LinearRow": ".bases",
    "ModelMismatchError": ".errors",
    "OptionError": ".errors",
    "OptionValueError": ".errors",
    "OtherCacheError": ".errors",
    "RUNTIME_METHODS": ".methods",
    "Rescaler": ".gate",
    "RuntimeMethod": ".methods",
    "Schedule": ".methods.schedule",
    "ScheduleConfig": ".methods.schedule",
    "ScheduleError": ".errors",
    "ScheduleOptions": ".methods.schedule",
    "SignatureMismatchError": ".errors",
    "StepCountError": ".errors",
    "TARGETS": ".targets",
    "TeaCacheConfig": ".methods.teacache",
    "TeaCacheGate": ".gate",
    "TeaCacheOptions": ".methods.teacache",
    "ThresholdError": ".errors",
    "apply": ".api",
    "apply_schedule": ".api",
    "document_for": ".methods.teacache",
    "load": ".loading",
    "parse": ".loading",
    "replay": ".gate",
    "schedule_document_for": ".methods.schedule",
}

if TYPE_CHECKING:  # the names, for type checkers and IDEs
    from .api import apply, apply_schedule  # noqa: F401
    from .bases import CfgForecast, ChebyshevForecast, LinearForecast, LinearRow  # noqa: F401
    from .decision import Decision  # noqa: F401
    from .errors import (CoefficientFileError, ForecastError, ModelMismatchError, OptionError,  # noqa: F401
                         OptionValueError, OtherCacheError, ScheduleError, SignatureMismatchError, StepCountError,
                         ThresholdError)
    from .forecast import Forecast, ForecastHistory, ForecastSpec  # noqa: F401
    from .gate import Rescaler, TeaCacheGate, replay  # noqa: F401
    from .handle import CacheHandle  # noqa: F401
    from .loading import load, parse  # noqa: F401
    from .methods import RUNTIME_METHODS, RuntimeMethod  # noqa: F401
    from .methods.block_cache import BlockCacheConfig, BlockCacheOptions  # noqa: F401
    from .methods.schedule import Schedule, ScheduleConfig, ScheduleOptions, schedule_document_for  # noqa: F401
    from .methods.teacache import ComponentRescaler, TeaCacheConfig, TeaCacheOptions, document_for  # noqa: F401
    from .targets import TARGETS  # noqa: F401


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
    "OptionError",
    "OptionValueError",
    "OtherCacheError",
    "RUNTIME_METHODS",
    "Rescaler",
    "RuntimeMethod",
    "Schedule",
    "ScheduleConfig",
    "ScheduleError",
    "ScheduleOptions",
    "SignatureMismatchError",
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


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
