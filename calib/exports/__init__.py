"""``calib export --format FORMAT``: one row of EXPORTERS per format. An exporter renders a document (or the result of a
fit the export job ran on traces) for the place it will be used; it does no file I/O (calib.jobs.export does).
Which methods a format takes is said by the methods (``CacheMethod.exports``), not here.

A new export format is a module here with its render function plus one EXPORTERS row (docs/architecture.md)."""

from __future__ import annotations

from . import diffusers, engines, poly1d
from .base import DOCUMENT, TRACE, TRACE_OR_DOCUMENT, ExportOptions, Rendered, Exporter


def _engine(function):
    def render(doc, options: ExportOptions) -> Rendered:
        return Rendered(*function(doc, options.threshold, options.component))

    return render


def _cache_dit(doc, options: ExportOptions) -> Rendered:
    text, usage, notes, summary = engines.cache_dit(doc, options.budget, options.component)
    return Rendered(text, usage, notes, summary)


EXPORTERS: dict[str, Exporter] = {
    "json": Exporter(DOCUMENT, poly1d.document_copy, listing=True, summary="a validated copy of the document"),
    "poly1d": Exporter(DOCUMENT, poly1d.poly1d, listing=True,
                       summary="the coefficient list and threshold for TeaCache-style scripts"),
    "diffusers-magcache": Exporter(TRACE, diffusers.magcache, summary="diffusers' MagCacheConfig"),
    "diffusers-fbcache": Exporter(TRACE, diffusers.fbcache, summary="diffusers' FirstBlockCacheConfig"),
    "diffusers-fastercache": Exporter(TRACE_OR_DOCUMENT, diffusers.fastercache, summary="diffusers' FasterCacheConfig"),
    "sglang": Exporter(DOCUMENT, _engine(engines.sglang), summary="sglang's TeaCacheParams"),
    "vllm-omni": Exporter(DOCUMENT, _engine(engines.vllm_omni), summary="vLLM-Omni's TeaCache cache_config"),
    "tensorrt-llm": Exporter(DOCUMENT, _engine(engines.tensorrt_llm),
                             summary="TensorRT-LLM VisualGen's TeaCache cache_config"),
    "cache-dit": Exporter(DOCUMENT, _cache_dit, summary="cache-dit's DBCacheConfig step mask"),
}

FORMATS = tuple(EXPORTERS)
DIFFUSERS_FORMATS = tuple(f for f in FORMATS if f.startswith("diffusers-"))
ENGINE_FORMATS = ("sglang", "vllm-omni", "tensorrt-llm")
MASK_FORMATS = ("cache-dit",)


def export_hints(doc: dict, formats) -> list[str]:
    """What ``calib fit`` says after writing ``doc``, whose method exports to ``formats``: for the engines'
    polynomial formats, which ones the document feeds as it is and the one command that makes a file for the others
    (they need the plain change, some degree 4)."""
    return [engines.teacache_formats(doc)] if set(formats) & set(ENGINE_FORMATS) else []
