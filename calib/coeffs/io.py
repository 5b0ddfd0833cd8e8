"""Coefficient documents on disk: serialise (``document_bytes``), write atomically through :mod:`calib._io`,
read back; each validated with ``validate`` (default: the method-agnostic checks of
:func:`calib.coeffs.validate.validate_document`; callers pass :func:`calib.methods.registry.validate` to add the
method's section check)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from calib._io import MAX_JSON_BYTES, parse_json, read_input, write_bytes
from calib.coeffs.validate import ROOT, json_type, validate_document
from calib.errors import CalibError

# validate(doc, source) -> doc: raises a one-line CalibError.
Validate = Callable[[dict, str], dict]


def _validate_plain(doc, source: str) -> dict:
    return validate_document(doc, source=source)


def document_bytes(doc: dict, path, *, validate: Validate = _validate_plain) -> bytes:
    """``doc`` validated and serialised as calib writes coefficient files (UTF-8 JSON, indent 2, no NaN)."""
    validate(doc, str(path))
    try:
        text = json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False)
    except ValueError as exc:  # a NaN that validation did not see (e.g. in an unknown section of a subclass)
        raise CalibError(f"{path}: {ROOT}: {exc}") from None
    except TypeError as exc:
        raise CalibError(f"{path}: {ROOT}: cannot be written as JSON ({exc})") from None
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (e.g. in provenance.notes) has no UTF-8 form
        raise CalibError(f"{path}: holds a character UTF-8 cannot encode ({text[exc.start:exc.end]!a}); "
                         "remove it") from None


def write_document(doc: dict, path, *, inputs=(), validate: Validate = _validate_plain) -> Path:
    """Validate ``doc``, then write it atomically as UTF-8 JSON (indent 2, no NaN) through calib's one write path
    (:func:`calib._io.write_bytes`). Returns the path."""
    path = Path(path)
    return write_bytes(path, document_bytes(doc, path, validate=validate), inputs=inputs)


def load_document(path, *, validate: Validate = _validate_plain) -> dict:
    """Read and validate a coefficient file; any problem is a one-line :class:`CalibError`."""
    path = Path(path)
    if not path.exists():
        raise CalibError(f"{path}: no such file")
    if path.is_dir():
        raise CalibError(f"{path}: is a directory, expected a coefficient JSON file")
    raw = read_input(path, what="a coefficient JSON file", limit=MAX_JSON_BYTES)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibError(
            f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); a coefficient file is JSON in UTF-8"
        ) from None
    if not text.strip():
        raise CalibError(f"{path}: not JSON: the file is empty")
    try:
        doc = parse_json(text)  # NaN/Infinity literals parse here and are rejected by validation with their path
    except json.JSONDecodeError as exc:
        raise CalibError(f"{path}: not JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except ValueError as exc:  # calib's limits: nesting depth, integer size
        raise CalibError(f"{path}: not a coefficient file calib reads: {exc}") from None
    if not isinstance(doc, dict):
        raise CalibError(f"{path}: {ROOT}: expected a JSON object, got {json_type(doc)}")
    return validate(doc, str(path))
