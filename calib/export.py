"""The coefficient file (format ``calib.coefficients``, schema version 1): build, validate, write, load.

The format is described in ``docs/coefficient-format.md`` and by the JSON Schema packaged as
``calib/schemas/coefficients.v1.schema.json``. Every problem with a document is reported as a :class:`CalibError`
with one line: ``"{source}: {where}: {what}"``, where ``where`` is the JSON path of the offending value.

:func:`write_atomic_bytes` hands a result file (coefficients, plots, reports) to calib's one write path,
:mod:`calib._io`: a temporary file in the target folder, every write checked, fsynced, read back, renamed over the
target, so a reader never sees half a file and a failed write leaves the old file as it was.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from calib import __version__
from calib.errors import CalibError

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "METHODS",
    "schema",
    "build_document",
    "validate_document",
    "write_document",
    "load_document",
    "write_atomic_bytes",
]

FORMAT = "calib.coefficients"
SCHEMA_VERSION = 1
METHODS = ("teacache", "block-cache", "fastercache-cfg", "schedule")
SCHEMA_RESOURCE = "coefficients.v1.schema.json"
DEFAULT_INDICATOR = {"name": "modulated_input"}

_ROOT = "(root)"


# ---------------------------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files("calib").joinpath("schemas", SCHEMA_RESOURCE).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema

    doc = json.loads(_schema_text())
    cls = jsonschema.validators.validator_for(doc)
    cls.check_schema(doc)
    return cls(doc)


def schema() -> dict:
    """The packaged JSON Schema (draft 2020-12) of version 1, as a fresh dict."""
    return json.loads(_schema_text())


# ---------------------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------------------
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


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _indicator(indicator: dict | None, model_info: dict) -> dict:
    value = indicator if indicator is not None else model_info.get("indicator")
    if value is None:
        return dict(DEFAULT_INDICATOR)
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict):
        return _to_jsonable(value)
    raise CalibError(f"indicator must be a name or an object, got {type(value).__name__}")


def _fit_section(res) -> dict:
    """``components.X.fit``: which fit was kept and why (calib.rescalers.AutoRescaler), or the plain fit."""
    r = res.rescaler
    fit: dict[str, Any] = {"method": str(getattr(r, "method_", "least_squares"))}
    if getattr(res, "exclude_forced", False):
        from .fit import FORCED_LAST_REASON

        fit["excluded_steps"] = {"rule": "forced_last", "points": int(getattr(res, "n_excluded", 0)),
                                 "reason": FORCED_LAST_REASON}
    if not hasattr(r, "constraint_"):  # a plain PolynomialRescaler: no selection, no shape check
        fit["streams"] = sorted({str(s) for s in np.asarray(res.streams).tolist()})
        return fit
    fit["constraint"] = str(r.constraint_)
    fit["reason"] = str(r.reason_)
    fit["streams"] = sorted({str(s) for s in np.asarray(res.streams).tolist()})
    selection: dict[str, Any] = {"mode": "auto" if r.degree_scores_ else "fixed", "reason": str(r.degree_reason_)}
    if r.degree_scores_:
        selection["cv_mae"] = {str(d): _metric(v) for d, v in sorted(r.degree_scores_.items())}
    fit["degree_selection"] = selection
    if r.method_scores_:
        fit["loss_comparison"] = {str(k): _metric(v) for k, v in r.method_scores_.items()}
    if r.constraint_ != "none":
        fit["unconstrained_cv_mae"] = _metric(r.unconstrained_cv_mae_)
    band = r.band_
    if band is not None:
        from .rescalers import WIDE_BAND

        fit["bootstrap"] = {
            "resamples": int(band["resamples"]),
            "central_domain": [float(band["central"][0]), float(band["central"][1])],
            "max_rel_halfwidth": _metric(band["max_rel_halfwidth"]),
            "at": _metric(band["at"]),
            "wide": bool(band["max_rel_halfwidth"] > WIDE_BAND),
        }
    return fit


def _fitted_indicator(fits: dict, model_info: dict) -> dict:
    """The indicator section for fits made by calib.fit: its name and normalisation; the module for modulated_input."""
    from .rescalers import INDICATORS

    base = _indicator(None, model_info)
    if base.get("name") not in INDICATORS:  # traces record the modulation layer's path as the indicator
        base = {"name": "modulated_input", "module": str(base.get("name"))}
    first = next(iter(fits.values()))
    name = str(getattr(first, "indicator", "modulated_input"))
    out = {"name": name}
    if name == "modulated_input" and base.get("module"):
        out["module"] = str(base["module"])
    out["normalization"] = str(getattr(first, "normalization", "none"))
    return out


def _component_entry(res) -> dict:
    r = res.rescaler
    coef = [float(c) for c in np.asarray(r.coef_, dtype=np.float64)]
    return {
        "coefficients": coef,
        "order": "highest_first",
        "degree": len(coef) - 1,
        "domain": [float(r.domain_[0]), float(r.domain_[1])],
        "fit": _fit_section(res),
        "metrics": {
            "points": int(r.n_points_),
            "trajectories": int(res.n_trajectories),
            "skipped_trajectories": int(res.n_skipped_trajectories),
            "dropped_points": int(r.n_dropped_),
            "r2": _metric(r.r2_),
            "mae": _metric(r.mae_),
            "rmse": _metric(r.rmse_),
            "cv_mae": _metric(r.cv_mae_),
            "cv_r2": _metric(r.cv_r2_),
            "cv_folds": int(r.cv_folds_),
        },
        **({"forecast": res.forecast} if getattr(res, "forecast", None) else {}),
    }


def build_document(
    fits: dict,
    trace_set,
    *,
    thresholds: dict | None = None,
    indicator: dict | None = None,
    created: str | None = None,
) -> dict:
    """Assemble a version-1 coefficient document from ``{component: FitResult}`` and the trace set they came from.

    ``indicator`` overrides ``trace_set.model_info["indicator"]`` (a dict, or a bare name); ``created`` overrides
    the current UTC time (for reproducible output). The result is validated before it is returned.
    """
    if not fits:
        raise CalibError("no fitted components to export — fit at least one component")
    from .method_docs import calibration_section, model_section

    model_info = dict(getattr(trace_set, "model_info", None) or {})
    model = model_section(trace_set)
    calibration = calibration_section(trace_set)

    doc: dict[str, Any] = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "method": "teacache",
        "calib_version": __version__,
        "created": created if created is not None else _utc_now(),
        "model": model,
        "indicator": _indicator(indicator, model_info) if indicator is not None else _fitted_indicator(fits, model_info),
        "calibration": calibration,
        "components": {str(name): _component_entry(res) for name, res in fits.items()},
    }
    if thresholds is not None:
        # A speedup over a compute fraction of 0 is infinite; JSON has no Infinity, so such values become null.
        doc["thresholds"] = _nan_to_null(_to_jsonable(copy.deepcopy(thresholds)))
    doc["provenance"] = {
        "source": "measured",
        "notes": f"fitted by calib {__version__} on {len(trace_set.trajectories)} traced trajectories",
    }
    return validate_document(doc, source="<built document>")


# ---------------------------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------------------------
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


def validate_document(doc: Any, *, source: str = "<document>") -> dict:
    """Check ``doc`` against version 1; return it unchanged or raise :class:`CalibError` with one line.

    Order: the top level is an object; ``format``; ``schema_version`` (dedicated message for other versions);
    the JSON Schema (the best-matching error, with its JSON path); then what the schema cannot say: ``degree`` is
    ``len(coefficients) - 1``, ``domain`` is ordered, and no number anywhere is NaN or infinite.
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

    error = jsonschema.exceptions.best_match(_validator().iter_errors(doc))
    if error is not None:
        where, what = _describe_schema_error(error)
        raise _fail(source, where, what)

    if doc["method"] != "teacache":  # block-cache, fastercache-cfg, schedule: their own section's code checks
        from .method_docs import check_method_section

        check_method_section(doc, source)
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


# ---------------------------------------------------------------------------------------------------------------
# write / load
# ---------------------------------------------------------------------------------------------------------------
def _new_file_mode() -> int:
    """Mode a plain open() would give a new file (kept for callers; calib._io.new_file_mode)."""
    from ._io import new_file_mode

    return new_file_mode()


def write_atomic_bytes(path, data: bytes, *, inputs=()) -> Path:
    """Write ``data`` to ``path`` through calib's one write path (:mod:`calib._io`): temp file in the target folder,
    every write checked, fsync, read back, rename; a device or FIFO is streamed, a symlink written through, an
    output that is one of ``inputs`` refused. On any failure ``path`` is left as it was (one-line CalibError)."""
    from ._io import write_bytes

    return write_bytes(path, data, inputs=inputs)


def document_bytes(doc: dict, path) -> bytes:
    """``doc`` validated and serialised as calib writes coefficient files (UTF-8 JSON, indent 2, no NaN)."""
    validate_document(doc, source=str(path))
    try:
        text = json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False)
    except ValueError as exc:  # a NaN that validation did not see (e.g. in an unknown section of a subclass)
        raise CalibError(f"{path}: {_ROOT}: {exc}") from None
    except TypeError as exc:
        raise CalibError(f"{path}: {_ROOT}: cannot be written as JSON ({exc})") from None
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (e.g. in provenance.notes) has no UTF-8 form
        raise CalibError(f"{path}: holds a character UTF-8 cannot encode ({text[exc.start:exc.end]!a}); "
                         "remove it") from None


def write_document(doc: dict, path, *, inputs=()) -> Path:
    """Validate ``doc``, then write it atomically as UTF-8 JSON (indent 2, no NaN). Returns the path."""
    path = Path(path)
    return write_atomic_bytes(path, document_bytes(doc, path), inputs=inputs)


def load_document(path) -> dict:
    """Read and validate a coefficient file; any problem is a one-line :class:`CalibError`."""
    from ._io import MAX_JSON_BYTES, parse_json, read_input

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
        raise CalibError(f"{path}: {_ROOT}: expected a JSON object, got {_json_type(doc)}")
    return validate_document(doc, source=str(path))
