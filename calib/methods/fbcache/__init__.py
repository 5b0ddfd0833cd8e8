"""Diffusers' First Block Cache: the threshold for a speed-up, replayed on the traced head residual.

Fitted by ``calib export --format diffusers-fbcache`` (no calib document). Modules: ``options``, ``method``."""

from calib.methods.base import CacheMethod
from calib.methods.fbcache.options import FbcacheOptions

METHOD = CacheMethod(
    name="fbcache",
    summary="diffusers' First Block Cache: the threshold for a speed-up, replayed on the traced head residual",
    options=FbcacheOptions,
    package=__name__,
    document=False,
    exports=("diffusers-fbcache",),
    fit_command=False,
)
