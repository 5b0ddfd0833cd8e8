"""The one coefficient-document validator: format and version, the JSON Schema, the method's own section check
(handed in by the caller, :func:`calib.methods.registry.validate`: coeffs sits below the methods and does not know
them), then no NaN/Infinity anywhere.

Every problem is one :class:`CalibError` line, ``"{source}: {where}: {what}"``, ``where`` the offending JSON path.
Also the conversions of fitted values into JSON (numpy scalars, NaN to null) that every method's document uses.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import numpy as np

from calib import __version__
from calib._io import check_unique_items
from calib.coeffs.schema import validator
from calib.errors import CalibError
from calib.runtime.document import FORMAT, SCHEMA_VERSION

ROOT = "(root)"

# section_check(doc, source): the method's code checks of its own section; raises CalibError.
SectionCheck = Callable[[dict, str], None]


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON types (floats stay floats, NaN stays NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.str_):
        return str(value)
    return value


def nan_to_null(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metric(value: Any) -> float | None:
    """A float metric for JSON: NaN/Inf (not computable) become null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, allow_nan=True, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_path(path) -> str:
    """A JSON path as the messages show it: ``components.transformer.coefficients[2]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or ROOT


def document_error(source: str, where: str, what: str) -> CalibError:
    """The one-line error of a document: ``"{source}: {where}: {what}"``."""
    what = " ".join(str(what).split())
    return CalibError(f"{source}: {where}: {what}")


def _describe_schema_error(error) -> tuple[str, str]:
    """(where, what) for a jsonschema ValidationError, worded for a person."""
    path = list(error.absolute_path)
    kind = error.validator
    value = error.validator_value
    inst = error.instance
    if kind == "required" and isinstance(inst, dict):
        missing = [p for p in value if p not in inst]
        name = missing[0] if missing else "?"
        return json_path(path + [name]), "required field is missing"
    if kind == "type":
        types = value if isinstance(value, list) else [value]
        return json_path(path), f"expected {' or '.join(types)}, got {json_type(inst)} {_short(inst, 40)}"
    if kind == "const":
        return json_path(path), f"must be {_short(value)}, got {_short(inst)}"
    if kind == "enum":
        choices = ", ".join(_short(v) for v in value)
        return json_path(path), f"{_short(inst)} is not one of {choices}"
    if kind == "pattern" and path and path[-1] == "created":
        return json_path(path), f"expected an RFC 3339 date-time such as 2026-11-23T08:00:00Z, got {_short(inst)}"
    if kind == "minProperties" and value == 1:
        return json_path(path), "must not be empty"
    if kind == "minItems":
        return json_path(path), f"needs at least {value} item(s), got {len(inst)}"
    if kind == "maxItems":
        return json_path(path), f"allows at most {value} item(s), got {len(inst)}"
    message = error.message
    if len(message) > 160:
        message = message[:159] + "…"
    return json_path(path), message


def _first_non_finite(value: Any, path: list) -> tuple[list, float] | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, dict):
        for k, v in value.items():
            found = _first_non_finite(v, path + [k])
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _first_non_finite(v, path + [i])
            if found:
                return found
    return None


def validate_document(doc: Any, *, source: str = "<document>", section_check: SectionCheck | None = None) -> dict:
    """Check ``doc`` against version 1; return it unchanged or raise :class:`CalibError` with one line.

    Order: the top level is an object; ``format``; ``schema_version`` (dedicated message for other versions);
    the JSON Schema (the best-matching error, with its JSON path); ``section_check(doc, source)``, when given (what
    the method's section schema cannot say); then no number anywhere may be NaN or infinite.
    """
    source = str(source)
    if not isinstance(doc, dict):
        raise document_error(source, ROOT, f"expected a JSON object, got {json_type(doc)}")

    fmt = doc.get("format")
    if fmt != FORMAT:
        got = "no \"format\" field" if "format" not in doc else f"\"format\" is {_short(fmt)}"
        raise document_error(source, "format", f"not a calib coefficient file ({got}; expected \"{FORMAT}\")")

    if "schema_version" not in doc:
        raise document_error(source, "schema_version", "required field is missing")
    version = doc["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise document_error(source, "schema_version", f"expected an integer, got {json_type(version)} {_short(version)}")
    if version > SCHEMA_VERSION:
        raise document_error(
            source,
            "schema_version",
            f"this file is version {version}; calib {__version__} reads version {SCHEMA_VERSION}"
            " — upgrade calib to read it",
        )
    if version != SCHEMA_VERSION:
        raise document_error(
            source,
            "schema_version",
            f"version {version} is not a known version; calib {__version__} reads version {SCHEMA_VERSION}",
        )

    import jsonschema

    checker = validator()
    check_unique_items(doc, checker.schema, source)  # in linear time: jsonschema's uniqueItems is quadratic
    error = jsonschema.exceptions.best_match(checker.iter_errors(doc))
    if error is not None:
        where, what = _describe_schema_error(error)
        raise document_error(source, where, what)

    if section_check is not None:  # the method's own section: what its schema cannot say
        section_check(doc, source)

    found = _first_non_finite(doc, [])
    if found is not None:
        path, value = found
        raise document_error(source, json_path(path), f"{value} is not allowed (JSON has no NaN/Infinity; write null)")
    return doc
