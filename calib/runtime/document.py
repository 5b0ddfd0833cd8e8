"""What every runtime document parser shares: format, version, the model section, one-line errors."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from .errors import CoefficientFileError, ForecastError

if TYPE_CHECKING:
    from .forecast import ForecastSpec

SCHEMA_VERSION = 1
FORMAT = "calib.coefficients"
NORMALIZATIONS = ("none", "delta_sigma")  # indicator.normalization: see calib.runtime.methods.teacache


def finite(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range is no finite float
        return False


def fail(source: str, where: str, what: str):
    raise CoefficientFileError(f"{source}: {where}: {what}")


def model_section(doc: dict, source: str) -> dict:
    """The document's ``model`` object; it must name the model class (every method's file does)."""
    model = doc.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("class"), str) or not model["class"]:
        fail(source, "model.class", "missing: the file must name the model class it was calibrated on")
    return model


def header_fields(doc: dict, model: dict, source: str) -> dict:
    """The config fields every method takes from the document's header (``model``: its checked
    :func:`model_section`): model identity, calibration, the checked validity signature, the document itself."""
    from .signature import check_signature  # torch: only a parser building a config gets here

    return {"model_class": model["class"], "config_hash": model.get("config_hash"), "source": model.get("source"),
            "adapter": model.get("adapter"), "calibration": dict(doc.get("calibration") or {}),
            "signature": check_signature(doc, source, fail), "document": doc}


def recommended_threshold(doc: dict, source: str) -> float | None:
    """``thresholds.recommended`` as a float, None when absent; a finite number >= 0 otherwise refused."""
    thresholds = doc.get("thresholds")
    if not isinstance(thresholds, dict) or thresholds.get("recommended") is None:
        return None
    recommended = thresholds["recommended"]
    if not finite(recommended) or recommended < 0:
        fail(source, "thresholds.recommended", "must be a finite number >= 0")
    return float(recommended)


def forecast_of(entry, source: str, where: str) -> "ForecastSpec":
    """A file's ``forecast`` entry as a forecast setting (absent: Newton order 0, reuse); one-line error otherwise."""
    try:
        from .forecast import ForecastSpec  # torch: only a document with a forecast to apply needs it

        return ForecastSpec.from_json(entry, where)
    except ForecastError as exc:
        raise CoefficientFileError(f"{source}: {exc}") from None


def check_with_jsonschema(doc: dict, source: str) -> None:
    try:
        import jsonschema
    except ImportError:  # optional at run time: the checks above cover what the runtime relies on
        return
    from importlib import resources

    try:
        schema_text = resources.files("calib").joinpath("schemas/coefficients.v1.schema.json").read_text("utf-8")
    except FileNotFoundError:
        return
    validator = jsonschema.Draft202012Validator(json.loads(schema_text))
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        fail(source, where, error.message)
