"""``calib export --format FORMAT``: one row of TARGETS per format. A target renders a document (or the result of a
fit the export job ran on traces) for the place it will be used; it does no file I/O (calib.jobs.export does).

A new target is a module here with its render function plus one TARGETS row (docs/architecture.md)."""

from __future__ import annotations

from . import diffusers, engines, poly1d
from .base import DOCUMENT, TRACE, TRACE_OR_DOCUMENT, ExportOptions, Rendered, Target


def _engine(function):
    def render(doc, options: ExportOptions) -> Rendered:
        return Rendered(*function(doc, options.threshold, options.component))

    return render


def _cache_dit(doc, options: ExportOptions) -> Rendered:
    text, usage, notes, summary = engines.cache_dit(doc, options.budget, options.component)
    return Rendered(text, usage, notes, summary)


TARGETS: dict[str, Target] = {
    "json": Target(DOCUMENT, ("teacache", "block-cache", "fastercache-cfg", "schedule"), poly1d.document_copy,
                   listing=True, summary="a validated copy of the document"),
    "poly1d": Target(DOCUMENT, ("teacache",), poly1d.poly1d, listing=True,
                     summary="the coefficient list and threshold for TeaCache-style scripts"),
    "diffusers-magcache": Target(TRACE, ("magcache",), diffusers.magcache, summary="diffusers' MagCacheConfig"),
    "diffusers-fbcache": Target(TRACE, ("fbcache",), diffusers.fbcache, summary="diffusers' FirstBlockCacheConfig"),
    "diffusers-fastercache": Target(TRACE_OR_DOCUMENT, ("fastercache-cfg",), diffusers.fastercache,
                                    summary="diffusers' FasterCacheConfig"),
    "sglang": Target(DOCUMENT, ("teacache",), _engine(engines.sglang), summary="sglang's TeaCacheParams"),
    "vllm-omni": Target(DOCUMENT, ("teacache",), _engine(engines.vllm_omni), summary="vLLM-Omni's TeaCache cache_config"),
    "tensorrt-llm": Target(DOCUMENT, ("teacache",), _engine(engines.tensorrt_llm),
                           summary="TensorRT-LLM VisualGen's TeaCache cache_config"),
    "cache-dit": Target(DOCUMENT, ("schedule",), _cache_dit, summary="cache-dit's DBCacheConfig step mask"),
}

FORMATS = tuple(TARGETS)
DIFFUSERS_FORMATS = tuple(f for f in FORMATS if f.startswith("diffusers-"))
ENGINE_FORMATS = ("sglang", "vllm-omni", "tensorrt-llm")
MASK_FORMATS = ("cache-dit",)
