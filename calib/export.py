"""Moved to calib.coeffs and calib.methods.teacache.document (issue 14); kept for old imports."""

from __future__ import annotations

import json  # noqa: F401  (test_reliability patches json.dumps through calib.export.json)

from calib._io import new_file_mode as _new_file_mode  # noqa: F401
from calib._io import write_bytes
from calib.coeffs import io as _io_doc
from calib.coeffs.document import utc_now as _utc_now  # noqa: F401
from calib.coeffs.schema import SCHEMA_RESOURCE, _schema_text, _validator, schema  # noqa: F401
from calib.coeffs.validate import (_ROOT, _describe_schema_error, _fail, _first_non_finite, _json_type,  # noqa: F401
                                   _metric, _nan_to_null, _short, _to_jsonable, _where)
from calib.methods import registry
from calib.methods.teacache import document as _teacache_document
from calib.methods.teacache.document import (DEFAULT_INDICATOR, _component_entry, _fit_section,  # noqa: F401
                                             _fitted_indicator, _indicator)
from calib.runtime.document import FORMAT, SCHEMA_VERSION  # noqa: F401

__all__ = ["FORMAT", "SCHEMA_VERSION", "METHODS", "schema", "build_document", "validate_document", "write_document",
           "load_document", "write_atomic_bytes"]

METHODS = registry.names(document=True)


def validate_document(doc, *, source: str = "<document>") -> dict:
    return registry.validate(doc, source)


def build_document(fits: dict, trace_set, *, thresholds: dict | None = None, indicator: dict | None = None,
                   created: str | None = None) -> dict:
    doc = _teacache_document.build_document(fits, trace_set, thresholds=thresholds, indicator=indicator,
                                            created=created)
    return validate_document(doc, source="<built document>")


def write_atomic_bytes(path, data: bytes, *, inputs=()):
    return write_bytes(path, data, inputs=inputs)


def document_bytes(doc: dict, path) -> bytes:
    return _io_doc.document_bytes(doc, path, validate=registry.validate)


def write_document(doc: dict, path, *, inputs=()):
    return _io_doc.write_document(doc, path, inputs=inputs, validate=registry.validate)


def load_document(path) -> dict:
    return _io_doc.load_document(path, validate=registry.validate)
