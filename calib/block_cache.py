"""Moved to calib.methods.block_cache and calib.jobs (issue 14); kept for old imports."""

from calib.jobs.fit import default_block_cache_out as default_out  # noqa: F401
from calib.jobs.fit import run_block_cache_fit as run_fit  # noqa: F401
from calib.jobs.tune import run_block_cache_tune as run_tune  # noqa: F401
from calib.methods import block_cache as _block_cache
from calib.methods import registry as _registry
from calib.methods.block_cache import *  # noqa: F401,F403
from calib.methods.block_cache import _nullable  # noqa: F401


def build_document(trace_set, *, target_fraction: float = DEFAULT_TARGET_FRACTION, streams=None,  # noqa: F405
                   created: str | None = None) -> tuple[dict, dict]:
    """The block-cache document, validated, and {component: (names, changes, schedule)} for plots."""
    doc, plots = _block_cache.build_document(trace_set, target_fraction=target_fraction, streams=streams,
                                             created=created)
    return _registry.validate(doc, "<built document>"), plots
