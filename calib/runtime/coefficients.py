"""Load a coefficient JSON into a validated :class:`CacheConfig` (standard library only).

The rules here are those of the packaged JSON Schema (``calib/schemas/coefficients.v1.schema.json``); when
``jsonschema`` is installed the file is also checked against that schema, so both stay in step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CoefficientFileError, ForecastError
from .forecast import Forecast
from .gate import Rescaler

SCHEMA_VERSION = 1
FORMAT = "calib.coefficients"
METHODS = ("teacache", "schedule")
MAX_COEFFICIENTS = 21  # degree 20: the schema's limit (calib fit goes to 9)
NORMALIZATIONS = ("none", "delta_sigma")  # indicator.normalization: see calib.runtime.api


@dataclass(frozen=True)
class ComponentRescaler:
    coefficients: tuple[float, ...]
    domain: tuple[float, float] | None
    # What a skipped step adds to the stack input: the last computed residual (order 0, TeaCache) or its forecast.
    forecast: Forecast = Forecast()

    def __post_init__(self):
        if not self.coefficients or not all(_finite(c) for c in self.coefficients):
            raise ValueError("coefficients must be a non-empty list of finite numbers")
        if self.domain is not None and not (self.domain[0] <= self.domain[1]):
            raise ValueError("domain must be [min, max] with min <= max")

    def rescaler(self) -> Rescaler:
        return Rescaler(self.coefficients, self.domain)


@dataclass(frozen=True)
class CacheConfig:
    """What the runtime needs from a coefficient file."""

    model_class: str
    components: dict[str, ComponentRescaler]
    config_hash: str | None = None
    source: str | None = None
    adapter: str | None = None
    indicator: dict = field(default_factory=dict)
    recommended_threshold: float | None = None
    calibration: dict = field(default_factory=dict)
    path: str | None = None
    document: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.components:
            raise ValueError("a cache config needs at least one component")
        if self.recommended_threshold is not None and not (
            _finite(self.recommended_threshold) and self.recommended_threshold >= 0
        ):
            raise ValueError("recommended threshold must be a finite number >= 0")


def _finite(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range is no finite float
        return False


def _fail(source: str, where: str, what: str):
    raise CoefficientFileError(f"{source}: {where}: {what}")


def _model_section(doc: dict, source: str) -> dict:
    """The document's ``model`` object; it must name the model class (every method's file does)."""
    model = doc.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("class"), str) or not model["class"]:
        _fail(source, "model.class", "missing: the file must name the model class it was calibrated on")
    return model


def _recommended_threshold(doc: dict, source: str) -> float | None:
    """``thresholds.recommended`` as a float, None when absent; a finite number >= 0 otherwise refused."""
    thresholds = doc.get("thresholds")
    if not isinstance(thresholds, dict) or thresholds.get("recommended") is None:
        return None
    recommended = thresholds["recommended"]
    if not _finite(recommended) or recommended < 0:
        _fail(source, "thresholds.recommended", "must be a finite number >= 0")
    return float(recommended)


def parse(doc: Any, source: str = "<document>") -> CacheConfig:
    """Validate a decoded coefficient document and build the config; one-line CoefficientFileError otherwise."""
    if not isinstance(doc, dict):
        _fail(source, "(top level)", "expected a JSON object")
    if doc.get("format") != FORMAT:
        _fail(source, "format", f"expected {FORMAT!r}, got {doc.get('format')!r}; is this a calib coefficient file?")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        _fail(source, "schema_version", f"this file is version {version!r}; this calib reads version {SCHEMA_VERSION}")
    method = doc.get("method")
    if method == "block-cache":  # per-block schedule: its own config and policy (calib.runtime.block_cache)
        from .block_cache import parse as parse_block_cache

        return parse_block_cache(doc, source)
    if method == "schedule":  # static per-step masks with a forecast in between (calib.runtime.schedule)
        from .schedule import parse as parse_schedule

        return parse_schedule(doc, source)
    if method not in METHODS:
        _fail(source, "method", f"{method!r} is not a method this runtime applies ({', '.join(METHODS)})")
    model = _model_section(doc, source)
    components = doc.get("components")
    if not isinstance(components, dict) or not components:
        _fail(source, "components", "missing or empty: expected at least one component with coefficients")
    parsed = {}
    for name, comp in components.items():
        where = f"components.{name}"
        if not isinstance(comp, dict):
            _fail(source, where, "expected an object")
        coefs = comp.get("coefficients")
        if not isinstance(coefs, list) or not coefs:
            _fail(source, f"{where}.coefficients", "missing or empty")
        if len(coefs) > MAX_COEFFICIENTS:  # as the schema (and calib export) allow: degree at most 20
            _fail(source, f"{where}.coefficients", f"{len(coefs)} coefficients; at most {MAX_COEFFICIENTS} (degree 20)")
        if not all(_finite(c) for c in coefs):
            _fail(source, f"{where}.coefficients", "every coefficient must be a finite number")
        if comp.get("order", "highest_first") != "highest_first":
            _fail(source, f"{where}.order", "only 'highest_first' (numpy.poly1d order) is defined")
        if "degree" in comp and comp["degree"] != len(coefs) - 1:
            _fail(source, f"{where}.degree", f"says {comp['degree']} but there are {len(coefs)} coefficients")
        domain = comp.get("domain")
        if domain is not None:
            if not (isinstance(domain, list) and len(domain) == 2 and all(_finite(d) for d in domain)):
                _fail(source, f"{where}.domain", "expected [min, max] of finite numbers, or null")
            if domain[0] > domain[1]:
                _fail(source, f"{where}.domain", f"min {domain[0]} is larger than max {domain[1]}")
            domain = (float(domain[0]), float(domain[1]))
        elif (doc.get("provenance") or {}).get("source") == "measured":  # as calib.export validates it
            _fail(source, f"{where}.domain", "is null, but measured coefficients must state the input range they "
                                             "were fitted on (the runtime clamps to it)")
        parsed[name] = ComponentRescaler(tuple(float(c) for c in coefs), domain,
                                         forecast_of(comp.get("forecast"), source, f"{where}.forecast"))
    indicator = doc.get("indicator")
    if isinstance(indicator, dict) and indicator.get("normalization", "none") not in NORMALIZATIONS:
        _fail(source, "indicator.normalization",
              f"{indicator.get('normalization')!r} is not one this runtime computes ({', '.join(NORMALIZATIONS)})")
    recommended = _recommended_threshold(doc, source)
    _check_with_jsonschema(doc, source)
    return CacheConfig(
        model_class=model["class"],
        components=parsed,
        config_hash=model.get("config_hash"),
        source=model.get("source"),
        adapter=model.get("adapter"),
        indicator=dict(doc.get("indicator") or {}),
        recommended_threshold=recommended,
        calibration=dict(doc.get("calibration") or {}),
        path=None,
        document=doc,
    )


def forecast_of(entry, source: str, where: str) -> Forecast:
    """A file's ``forecast`` entry as a :class:`Forecast` (absent: order 0, reuse); one-line error otherwise."""
    try:
        return Forecast.from_json(entry, where)
    except ForecastError as exc:
        raise CoefficientFileError(f"{source}: {exc}") from None


def _check_with_jsonschema(doc: dict, source: str) -> None:
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
        _fail(source, where, error.message)


def document_for(
    transformer,
    coefficients=(1.0, 0.0),
    *,
    components=("transformer",),
    domain=None,
    indicator: str = "modulated_input",
    recommended: float | None = None,
    forecast: Forecast | None = None,
) -> dict:
    """A coefficient document for ``transformer``'s class and config, written in code rather than fitted: the same
    polynomial (highest degree first) for each of ``components``. ``[1, 0]``, the default, is TeaCache's rule
    without rescaling. ``forecast``: what skipped steps add (absent: reuse, order 0). ``parse`` it (after changing
    what you need) to apply it."""
    from datetime import datetime, timezone

    from .. import __version__
    from ..adapters import model_identity

    identity = model_identity(transformer)
    coefficients = [float(c) for c in coefficients]
    doc = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "method": "teacache",
        "calib_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"class": identity["class"], "config_hash": identity["config_hash"]},
        "indicator": {"name": indicator},
        "calibration": {},
        "components": {
            name: {"coefficients": coefficients, "order": "highest_first", "degree": len(coefficients) - 1,
                   "domain": None if domain is None else list(domain),
                   **({} if forecast is None else {"forecast": forecast.as_json()})}
            for name in components
        },
    }
    if recommended is not None:
        doc["thresholds"] = {"recommended": recommended}
    return doc


def load(path: str | Path) -> CacheConfig:
    """Read and validate a coefficient JSON. Every problem is one line naming the file."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise CoefficientFileError(f"{source}: no such file")
    if path.is_dir():
        raise CoefficientFileError(f"{source}: is a directory, expected a coefficient JSON file")
    from .._io import MAX_JSON_BYTES, parse_json, read_input
    from ..errors import CalibError

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
    config = parse(doc, source)
    object.__setattr__(config, "path", source)
    return config


def _reject_constant(name: str):
    raise ValueError(f"contains {name}, which is not a finite number")
