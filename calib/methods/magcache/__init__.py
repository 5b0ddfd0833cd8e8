"""Diffusers' MagCache: mag_ratios and the threshold for a speed-up, measured on the traces.

Fitted by ``calib export --format diffusers-magcache`` (no calib document). Modules: ``options``, ``method``."""

from calib.methods.base import CacheMethod
from calib.methods.magcache.options import MagcacheOptions

METHOD = CacheMethod(
    name="magcache",
    summary="diffusers' MagCache: mag_ratios and the threshold for a speed-up, measured on the traces",
    options=MagcacheOptions,
    package=__name__,
    document=False,
    exports=("diffusers-magcache",),
    fit_command=False,
)
