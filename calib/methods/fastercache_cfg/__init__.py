"""FasterCache's CFG cache (arXiv 2410.19355): where the unconditional pass can reuse the cond - uncond difference,
from the traced change of that difference. Modules: ``options``, ``method`` (fit, describe), ``section``."""

from calib.methods.base import CacheMethod
from calib.methods.fastercache_cfg.options import FastercacheCfgOptions

METHOD = CacheMethod(
    name="fastercache-cfg",
    summary="where the unconditional pass can reuse the cond-uncond difference",
    options=FastercacheCfgOptions,
    package=__name__,
    exports=("json", "diffusers-fastercache"),
    out_suffix=".fastercache.json",
)
