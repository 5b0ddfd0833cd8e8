"""``auto``: fit teacache and schedule, keep the better at a budget on held-out prompts (it writes that one's
document, the other beside it). Modules: ``options``, ``method`` (fit, the comparison, describe)."""

from calib.methods.base import CacheMethod
from calib.methods.auto.options import AutoOptions

METHOD = CacheMethod(
    name="auto",
    summary="fit teacache and schedule, keep the better with the forecast on held-out prompts",
    options=AutoOptions,
    package=__name__,
    document=False,  # it writes the kept candidate's document (teacache or schedule)
    needs_model=True,
)
