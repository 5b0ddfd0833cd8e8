"""parse / load: format and version, then the method's own parser (:data:`calib.runtime.methods.RUNTIME_METHODS`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from calib._io import MAX_JSON_BYTES, parse_json, read_input
from calib.errors import CalibError

from .artifacts import resolve
from .document import FORMAT, SCHEMA_VERSION, fail
from .errors import CoefficientFileError
from .methods import RUNTIME_METHODS

# The document's method -> its parser.
PARSERS = {name: method.parse for name, method in RUNTIME_METHODS.items()}


def parse(doc: Any, source: str = "<document>"):
    """Validate a decoded coefficient document and build its method's config (``TeaCacheConfig``,
    ``ScheduleConfig``, ``BlockCacheConfig``); one-line CoefficientFileError otherwise."""
    if not isinstance(doc, dict):
        fail(source, "(top level)", "expected a JSON object")
    if doc.get("format") != FORMAT:
        fail(source, "format", f"expected {FORMAT!r}, got {doc.get('format')!r}; is this a calib coefficient file?")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        fail(source, "schema_version", f"this file is version {version!r}; this calib reads version {SCHEMA_VERSION}")
    method = doc.get("method")
    if method not in PARSERS:
        fail(source, "method", f"{method!r} is not a method this runtime applies ({', '.join(PARSERS)})")
    return PARSERS[method](doc, source)


def load(path: str | Path):
    """Read and validate a coefficient JSON; the config records its ``path``. Every problem is one line naming the
    file. A string may also name a file calib ships, a model folder's or Hub repo's ``calib/<name>.json``
    (calib.runtime.artifacts)."""
    path = resolve(path)
    source = str(path)
    if not path.exists():
        raise CoefficientFileError(f"{source}: no such file")
    if path.is_dir():
        raise CoefficientFileError(f"{source}: is a directory, expected a coefficient JSON file")

    try:
        raw = read_input(path, what="a coefficient JSON file", limit=MAX_JSON_BYTES)  # regular, not too large
    except CalibError as exc:  # unreadable (permissions), a FIFO or device, too large
        raise CoefficientFileError(str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CoefficientFileError(f"{source}: not UTF-8 text; expected a coefficient JSON file") from None
    try:
        # Non-finite literals (NaN, Infinity) are not JSON; refuse them instead of letting them into a gate.
        # calib's limits (nesting depth, integer size) keep a hostile file from RecursionError / huge ints.
        doc = parse_json(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise CoefficientFileError(f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except ValueError as exc:
        raise CoefficientFileError(f"{source}: {exc}") from None
    return dataclasses.replace(parse(doc, source), path=source)


def _reject_constant(name: str):
    raise ValueError(f"contains {name}, which is not a finite number")
