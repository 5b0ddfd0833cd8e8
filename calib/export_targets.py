"""Moved to calib.targets (engines) and calib.jobs.export (run_export) (issue 14); kept for old imports."""

from calib.jobs.export import DEFAULT_TARGET_SPEEDUP, _is_trace, run_export  # noqa: F401
from calib.targets import DIFFUSERS_FORMATS, ENGINE_FORMATS, MASK_FORMATS
from calib.targets.engines import _teacache_terms, cache_dit, sglang, tensorrt_llm, vllm_omni  # noqa: F401

FORMATS = DIFFUSERS_FORMATS + ENGINE_FORMATS + MASK_FORMATS  # the old meaning: every format but json and poly1d
