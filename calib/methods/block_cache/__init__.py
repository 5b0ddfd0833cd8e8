"""Block Caching (arXiv 2312.03209): a static per-block mask from the traced block changes.

Modules: ``options``, ``method`` (fit, tune, describe, the heat-map), ``rule`` (the runtime's rule on the traced
changes), ``section`` (the document's block_cache section: schema and checks)."""

from calib.methods.base import CacheMethod
from calib.methods.block_cache.options import BlockCacheOptions

METHOD = CacheMethod(
    name="block-cache",
    summary="a per-block mask (Block Caching) + heat-map",
    options=BlockCacheOptions,
    package=__name__,
    runtime="block-cache",
    exports=("json",),
    out_suffix=".blockcache.json",
)
