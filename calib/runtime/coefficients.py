"""The teacache document: its parser (``parse_teacache``, one row of ``loading.PARSERS``), :class:`CacheConfig`
and ``document_for`` (standard library only).

The rules here are those of the packaged JSON Schema (``calib/schemas/coefficients.v1.schema.json``); when
``jsonschema`` is installed the file is also checked against that schema, so both stay in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from calib import __version__
from calib.adapters import model_identity
from calib.runtime.document import (  # noqa: F401
    FORMAT, NORMALIZATIONS, SCHEMA_VERSION, _check_with_jsonschema, _fail, _finite, _model_section,
    _recommended_threshold, forecast_of)
from calib.runtime.forecast import Forecast
from calib.runtime.gate import Rescaler

MAX_COEFFICIENTS = 21  # degree 20: the schema's limit (calib fit goes to 9)


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


def parse_teacache(doc: Any, source: str = "<document>") -> CacheConfig:
    """Validate a decoded teacache document (format and version already checked by ``loading.parse``) and build
    the config; one-line CoefficientFileError otherwise."""
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
        elif (doc.get("provenance") or {}).get("source") == "measured":  # as calib.methods.registry.validate checks it
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
