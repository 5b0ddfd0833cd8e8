"""Moved to calib.methods.fastercache_cfg and calib.jobs.fit (issue 14); kept for old imports."""

from calib.jobs.fit import default_fastercache_out as default_out  # noqa: F401
from calib.jobs.fit import run_fastercache_fit as run_fit  # noqa: F401
from calib.methods import fastercache_cfg as _fastercache_cfg
from calib.methods import registry as _registry
from calib.methods.fastercache_cfg import *  # noqa: F401,F403
from calib.methods.fastercache_cfg import _median_over, _nullable  # noqa: F401


def build_document(trace_set, *, cfg_tolerance=None, attention_tolerance=None, created=None) -> dict:
    """The fastercache-cfg document, validated."""
    doc = _fastercache_cfg.build_document(trace_set, cfg_tolerance=cfg_tolerance,
                                          attention_tolerance=attention_tolerance, created=created)
    return _registry.validate(doc, "<built document>")
