"""TeaCache at run time (method ``teacache``): the coefficient file (:class:`TeaCacheConfig`, :func:`parse`,
:func:`document_for`), the keywords ``apply()`` takes for it (:class:`TeaCacheOptions`) and what it puts on the hook
engine: a :class:`~calib.runtime.policies.Gate` on the indicator the file names and each component's forecast.

The rules here are those of the packaged JSON Schema (``calib/schemas/coefficients.v1.schema.json``); when
``jsonschema`` is installed the file is also checked against that schema, so both stay in step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from calib import __version__
from calib.adapters import get_adapter, model_identity

from ..document import (FORMAT, NORMALIZATIONS, SCHEMA_VERSION, check_with_jsonschema, fail, finite, forecast_of,
                        header_fields, model_section, recommended_threshold)
from ..engine import BLOCK_INPUT, INDICATORS, MODULATED_INPUT, TEMB, Engine, steps_with
from ..errors import OptionValueError
from ..forecast import Forecast, ForecastSpec
from ..gate import Rescaler
from ..handle import CacheHandle, check_model, choose_threshold, components_of
from ..options import CommonOptions, as_sigmas, check_forecast, check_threshold
from ..signature import SignatureCheck
from ..policies import Gate
from . import RuntimeMethod

METHOD = "teacache"
MAX_COEFFICIENTS = 21  # degree 20: the schema's limit (calib fit goes to 9)


@dataclass(frozen=True)
class ComponentRescaler:
    coefficients: tuple[float, ...]
    domain: tuple[float, float] | None
    # What a skipped step gets: the last computed stack residual (Newton order 0, TeaCache's reuse) or a forecast.
    forecast: ForecastSpec = Forecast()

    def __post_init__(self):
        if not self.coefficients or not all(finite(c) for c in self.coefficients):
            raise ValueError("coefficients must be a non-empty list of finite numbers")
        if self.domain is not None and not (self.domain[0] <= self.domain[1]):
            raise ValueError("domain must be [min, max] with min <= max")

    def rescaler(self) -> Rescaler:
        return Rescaler(self.coefficients, self.domain)


@dataclass(frozen=True)
class TeaCacheConfig:
    """What the runtime needs from a teacache coefficient file."""

    method: ClassVar[str] = METHOD

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
    signature: dict | None = None  # the file's validity signature (calib.runtime.signature); None: it has none

    def __post_init__(self):
        if not self.components:
            raise ValueError("a cache config needs at least one component")
        if self.recommended_threshold is not None and not (
            finite(self.recommended_threshold) and self.recommended_threshold >= 0
        ):
            raise ValueError("recommended threshold must be a finite number >= 0")


def parse(doc: Any, source: str = "<document>") -> TeaCacheConfig:
    """Validate a decoded teacache document (format and version already checked by ``loading.parse``) and build
    the config; one-line CoefficientFileError otherwise."""
    model = model_section(doc, source)
    components = doc.get("components")
    if not isinstance(components, dict) or not components:
        fail(source, "components", "missing or empty: expected at least one component with coefficients")
    parsed = {}
    for name, comp in components.items():
        where = f"components.{name}"
        if not isinstance(comp, dict):
            fail(source, where, "expected an object")
        coefs = comp.get("coefficients")
        if not isinstance(coefs, list) or not coefs:
            fail(source, f"{where}.coefficients", "missing or empty")
        if len(coefs) > MAX_COEFFICIENTS:  # as the schema (and calib export) allow: degree at most 20
            fail(source, f"{where}.coefficients", f"{len(coefs)} coefficients; at most {MAX_COEFFICIENTS} (degree 20)")
        if not all(finite(c) for c in coefs):
            fail(source, f"{where}.coefficients", "every coefficient must be a finite number")
        if comp.get("order", "highest_first") != "highest_first":
            fail(source, f"{where}.order", "only 'highest_first' (numpy.poly1d order) is defined")
        if "degree" in comp and comp["degree"] != len(coefs) - 1:
            fail(source, f"{where}.degree", f"says {comp['degree']} but there are {len(coefs)} coefficients")
        domain = comp.get("domain")
        if domain is not None:
            if not (isinstance(domain, list) and len(domain) == 2 and all(finite(d) for d in domain)):
                fail(source, f"{where}.domain", "expected [min, max] of finite numbers, or null")
            if domain[0] > domain[1]:
                fail(source, f"{where}.domain", f"min {domain[0]} is larger than max {domain[1]}")
            domain = (float(domain[0]), float(domain[1]))
        elif (doc.get("provenance") or {}).get("source") == "measured":  # as calib.methods.registry.validate checks it
            fail(source, f"{where}.domain", "is null, but measured coefficients must state the input range they "
                                             "were fitted on (the runtime clamps to it)")
        parsed[name] = ComponentRescaler(tuple(float(c) for c in coefs), domain,
                                         forecast_of(comp.get("forecast"), source, f"{where}.forecast"))
    indicator = doc.get("indicator")
    if isinstance(indicator, dict) and indicator.get("normalization", "none") not in NORMALIZATIONS:
        fail(source, "indicator.normalization",
              f"{indicator.get('normalization')!r} is not one this runtime computes ({', '.join(NORMALIZATIONS)})")
    recommended = recommended_threshold(doc, source)
    check_with_jsonschema(doc, source)
    return TeaCacheConfig(
        components=parsed,
        indicator=dict(doc.get("indicator") or {}),
        recommended_threshold=recommended,
        **header_fields(doc, model, source),
    )


def document_for(
    transformer,
    coefficients=(1.0, 0.0),
    *,
    components=("transformer",),
    domain=None,
    indicator: str = "modulated_input",
    recommended: float | None = None,
    forecast: ForecastSpec | None = None,
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
        "method": METHOD,
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


@dataclass(frozen=True)
class TeaCacheOptions(CommonOptions):
    """``apply(pipe, teacache_config, ...)``'s keywords (and :class:`~calib.runtime.options.CommonOptions`'):
    ``threshold`` the accumulated rescaled change under which steps are skipped (default: the file's recommended
    one; 0 reproduces the uncached output exactly); ``forecast`` what a skipped step gets, replacing every
    component's file forecast; ``sigmas`` a bare transformer's noise levels (``scheduler.sigmas``), for
    ``delta_sigma`` coefficients or a forecast in σ."""

    threshold: float | None = None
    forecast: ForecastSpec | None = None
    sigmas: Sequence[float] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.threshold is not None:
            check_threshold(self.threshold)
        check_forecast(self.forecast)
        object.__setattr__(self, "sigmas", as_sigmas(self.sigmas))


def indicator_of(config: TeaCacheConfig) -> tuple[str, bool]:
    """(what the gate watches, whether changes are normalised by Δσ) from the file's ``indicator`` section.

    ``block_input`` (the first block's hidden_states argument) and ``temb`` (its timestep-embedding argument) are
    computed as ``calib trace`` recorded them; any other name is the modulated input, TeaCache's indicator."""
    indicator = config.indicator or {}
    name = indicator.get("name")
    kind = name if name in (BLOCK_INPUT, TEMB) else MODULATED_INPUT
    return kind, indicator.get("normalization", "none") == "delta_sigma"


def custom_module(config: TeaCacheConfig) -> str | None:
    """A file made with ``--modulation-module`` for a class calib has no adapter for names its layer (``calib fit``
    writes it as the indicator's name; ``module`` where a file gives both)."""
    if config.adapter == "custom":
        name = config.indicator.get("name")
        return config.indicator.get("module") or (None if name in INDICATORS else name)
    return None


def install(pipe, config: TeaCacheConfig, options: TeaCacheOptions) -> CacheHandle:
    """A gate per component, on the indicator the file names, with the component's forecast (or ``options``')."""
    threshold = choose_threshold(options.threshold, config, "coefficient")
    watches, normalized = indicator_of(config)
    forecasts = {name: options.forecast or comp.forecast for name, comp in config.components.items()}
    components, scheduler = components_of(pipe, config, "one polynomial per expert")
    if not steps_with(scheduler):
        if normalized and options.sigmas is None:
            raise OptionValueError(
                f"{config.path or 'these coefficients'} expect the indicator normalised by the step's change in noise"
                " level (indicator.normalization = delta_sigma), which a bare transformer cannot know: pass"
                " sigmas=scheduler.sigmas (after set_timesteps), or apply to the pipeline")
        if any(forecasts[name].variable == "sigma" for name, _ in components) and options.sigmas is None:
            raise OptionValueError(
                "the forecast is in the noise level (variable sigma), which a bare transformer cannot know: pass"
                " sigmas=scheduler.sigmas (after set_timesteps), or apply to the pipeline")
    engine = Engine(scheduler, num_steps=options.num_steps, sigmas=options.sigmas)
    handle = CacheHandle(config, engine, threshold=threshold,
                         signature=SignatureCheck(config, strict=options.strict, what="coefficients", pipe=pipe))
    with handle.installing():
        for name, transformer in components:
            check_model(handle, name, transformer, options.allow_model_mismatch)
            adapter = get_adapter(transformer, options.modulation_module or custom_module(config))
            gate = Gate(config.components[name].rescaler(), threshold, watches=watches, normalized=normalized)
            handle.attach(name, transformer, adapter, policy=gate, forecast=forecasts[name])
        handle.watch(scheduler)
    if not engine.pipeline_mode and options.num_steps is None:
        warnings.warn("applied to a bare transformer without num_steps: the last step cannot be forced to compute; "
                      "pass num_steps=... or apply to the pipeline", stacklevel=3)
    return handle


TEACACHE = RuntimeMethod(METHOD, TeaCacheConfig, TeaCacheOptions, parse, install)
