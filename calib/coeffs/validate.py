"""The one coefficient-document validator: format and version, the JSON Schema, then what the schema cannot say
(degree, domain, no NaN/Infinity) and the method's own section check, handed in by the caller
(:func:`calib.methods.registry.validate`: coeffs sits below the methods and does not know them).

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
from calib.coeffs.schema import _validator
from calib.errors import CalibError
from calib.runtime.document import FORMAT, SCHEMA_VERSION

_ROOT = "(root)"

# section_check(doc, source): the method's code checks of its own section; raises CalibError.
SectionCheck = Callable[[dict, str], None]


def _to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON types (floats stay floats, NaN stays NaN)."""
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_to_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.str_):
        return str(value)
    return value


def _nan_to_null(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _metric(value: Any) -> float | None:
    """A float metric for JSON: NaN/Inf (not computable) become null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_type(value: Any) -> str:
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


def _where(path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or _ROOT


def _fail(source: str, where: str, what: str) -> CalibError:
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
        return _where(path + [name]), "required field is missing"
    if kind == "type":
        types = value if isinstance(value, list) else [value]
        return _where(path), f"expected {' or '.join(types)}, got {_json_type(inst)} {_short(inst, 40)}"
    if kind == "const":
        return _where(path), f"must be {_short(value)}, got {_short(inst)}"
    if kind == "enum":
        choices = ", ".join(_short(v) for v in value)
        return _where(path), f"{_short(inst)} is not one of {choices}"
    if kind == "pattern" and path and path[-1] == "created":
        return _where(path), f"expected an RFC 3339 date-time such as 2026-11-23T08:00:00Z, got {_short(inst)}"
    if kind == "minProperties" and value == 1:
        return _where(path), "must not be empty"
    if kind == "minItems":
        return _where(path), f"needs at least {value} item(s), got {len(inst)}"
    if kind == "maxItems":
        return _where(path), f"allows at most {value} item(s), got {len(inst)}"
    message = error.message
    if len(message) > 160:
        message = message[:159] + "…"
    return _where(path), message


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
    the JSON Schema (the best-matching error, with its JSON path); then what the schema cannot say: ``degree`` is
    ``len(coefficients) - 1``, ``domain`` is ordered, and no number anywhere is NaN or infinite.
    ``section_check(doc, source)``, when given, runs right after the schema (the method's own section).
    """
    source = str(source)
    if not isinstance(doc, dict):
        raise _fail(source, _ROOT, f"expected a JSON object, got {_json_type(doc)}")

    fmt = doc.get("format")
    if fmt != FORMAT:
        got = "no \"format\" field" if "format" not in doc else f"\"format\" is {_short(fmt)}"
        raise _fail(source, "format", f"not a calib coefficient file ({got}; expected \"{FORMAT}\")")

    if "schema_version" not in doc:
        raise _fail(source, "schema_version", "required field is missing")
    version = doc["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise _fail(source, "schema_version", f"expected an integer, got {_json_type(version)} {_short(version)}")
    if version > SCHEMA_VERSION:
        raise _fail(
            source,
            "schema_version",
            f"this file is version {version}; calib {__version__} reads version {SCHEMA_VERSION}"
            " — upgrade calib to read it",
        )
    if version != SCHEMA_VERSION:
        raise _fail(
            source,
            "schema_version",
            f"version {version} is not a known version; calib {__version__} reads version {SCHEMA_VERSION}",
        )

    import jsonschema

    validator = _validator()
    check_unique_items(doc, validator.schema, source)  # in linear time: jsonschema's uniqueItems is quadratic
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        where, what = _describe_schema_error(error)
        raise _fail(source, where, what)

    if section_check is not None:  # block-cache, fastercache-cfg, schedule: their own section's code checks
        section_check(doc, source)
    for name, comp in doc.get("components", {}).items():
        base = ["components", name]
        coef = comp["coefficients"]
        if comp["degree"] != len(coef) - 1:
            raise _fail(
                source,
                _where(base + ["degree"]),
                f"is {comp['degree']} but coefficients has {len(coef)} entries (degree {len(coef) - 1})",
            )
        for i, c in enumerate(coef):
            if not math.isfinite(c):
                raise _fail(source, _where(base + ["coefficients", i]), f"{c} is not a finite number")
        domain = comp["domain"]
        if domain is None and (doc.get("provenance") or {}).get("source") == "measured":
            raise _fail(
                source, _where(base + ["domain"]),
                "is null, but measured coefficients must state the input range they were fitted on (the runtime"
                " clamps to it)",
            )
        if domain is not None:
            lo, hi = domain
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise _fail(source, _where(base + ["domain"]), f"[{lo}, {hi}] is not finite")
            if lo > hi:
                raise _fail(source, _where(base + ["domain"]), f"min {lo!r} is greater than max {hi!r}")

    found = _first_non_finite(doc, [])
    if found is not None:
        path, value = found
        raise _fail(source, _where(path), f"{value} is not allowed (JSON has no NaN/Infinity; write null)")
    return doc
