"""What an export format is: which input it takes and how it renders the artifact (the methods it takes say so
themselves: ``CacheMethod.exports``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

TRACE = "trace"  # measured on traces: the job runs a fit on them, the exporter renders the fit's result
DOCUMENT = "document"  # a calib coefficient document
TRACE_OR_DOCUMENT = "trace or document"  # a document, or traces the job fits one on first


@dataclass(frozen=True)
class ExportOptions:
    """The ``calib export`` options an exporter may read; ``target_speedup`` is already defaulted by the job."""

    source: Path
    out: Path | None = None
    threshold: float | None = None
    target_speedup: float | None = None
    component: str | None = None
    budget: int | None = None


@dataclass(frozen=True)
class Rendered:
    """The artifact (``text``) and what goes to stderr beside it: a summary, how to load it, notes."""

    text: str
    usage: str | None = None
    notes: list[str] = field(default_factory=list)
    summary: str | None = None
    document: dict | None = None  # json: the document itself, so that --out writes it through the document writer


@dataclass(frozen=True)
class Exporter:
    input: str  # TRACE, DOCUMENT or TRACE_OR_DOCUMENT (TRACE: the job runs the fit of the method that lists it)
    render: Callable[[Any, ExportOptions], Rendered]
    listing: bool = False  # calib's own stdout listing (json, poly1d): no summary, usage or notes on stderr
    summary: str = ""  # one line for docs and help
