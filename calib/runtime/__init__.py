"""calib's runtime cache: load a coefficient JSON, apply it, read the stats. Imports torch and the standard library
only (diffusers is used when present).

    import calib.runtime as cr
    config = cr.load("coeffs/digits.json")
    handle = cr.apply(pipe, config, threshold=0.3)
    image = pipe("a handwritten 7").images[0]
    print(handle.stats())
    handle.remove()
"""

from .api import CacheHandle, apply
from .block_cache import BlockCacheConfig, BlockCacheHandle
from .coefficients import CacheConfig, ComponentRescaler, document_for, load, parse
from .errors import CoefficientFileError, ModelMismatchError, ThresholdError
from .gate import Rescaler, TeaCacheGate, replay

__all__ = [
    "BlockCacheConfig",
    "BlockCacheHandle",
    "CacheConfig",
    "CacheHandle",
    "CoefficientFileError",
    "ComponentRescaler",
    "ModelMismatchError",
    "Rescaler",
    "TeaCacheGate",
    "ThresholdError",
    "apply",
    "document_for",
    "load",
    "parse",
    "replay",
]
