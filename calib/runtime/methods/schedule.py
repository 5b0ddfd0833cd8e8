"""Static schedules at run time (method ``schedule``): which steps compute, fixed in advance per budget and component,
with the file's forecast on the steps in between. The file (:class:`ScheduleConfig`, :func:`parse`,
:func:`schedule_document_for`), the keywords ``apply()`` takes for it (:class:`ScheduleOptions`) and what it puts on the
hook engine: a :class:`~calib.runtime.policies.StepMask` per component and the file's forecast.

    import calib.runtime as cr
    config = cr.load("coeffs/digits.schedule.json")    # a ScheduleConfig
    handle = cr.apply(pipe, config, budget=15)         # default: the recommended budget
    images = pipe("a handwritten 7", num_inference_steps=config.steps).images

A schedule is searched for one step count; another is refused (:class:`~calib.runtime.errors.StepCountError`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from calib import __version__
from calib.adapters import get_adapter, model_identity

from ..document import FORMAT, SCHEMA_VERSION, check_with_jsonschema, fail, forecast_of, header_fields, model_section
from ..engine import Engine, steps_with
from ..errors import OptionError, OptionValueError, ScheduleError, StepCountError
from ..forecast import Forecast, ForecastSpec
from ..handle import CacheHandle, check_model, components_of, transformer_of
from ..bases import CfgForecast
from ..options import CommonOptions, as_sigmas, check_budget, check_count, check_forecast, is_budget, is_int
from ..signature import SignatureCheck
from ..policies import StepMask
from . import RuntimeMethod

METHOD = "schedule"
SEARCHES = ("measured", "min_sum", "minimax")


@dataclass(frozen=True)
class Schedule:
    """One budget's mask: per component, the step indices that compute; ``forecast`` what its skipped steps get when
    the search chose one for this budget (else the file's)."""

    budget: float
    components: dict[str, tuple[int, ...]]
    search: str | None = None
    error: dict = field(default_factory=dict)
    forecast: ForecastSpec | None = None
    # per component, steps where only the conditional CFG branch computes (batched guidance, a cfg forecast)
    cond_only: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleConfig:
    """What the runtime needs from a schedule file."""

    model_class: str
    steps: int
    schedules: dict[float, Schedule]  # by budget
    forecast: ForecastSpec = Forecast()
    recommended_budget: float | None = None
    config_hash: str | None = None
    source: str | None = None
    adapter: str | None = None
    calibration: dict = field(default_factory=dict)
    path: str | None = None
    document: dict = field(default_factory=dict, repr=False)
    signature: dict | None = None  # the file's validity signature (calib.runtime.signature); None: it has none

    method: ClassVar[str] = METHOD

    @property
    def components(self) -> tuple[str, ...]:
        """The component names every schedule lists (``transformer``, and ``transformer_2`` for two experts)."""
        return tuple(next(iter(self.schedules.values())).components)

    @property
    def recommended_threshold(self) -> None:
        """A schedule has no threshold (code written for coefficient files asks; ``apply`` takes ``budget=``)."""
        return None

    @property
    def budgets(self) -> list[float]:
        return sorted(self.schedules)

    def schedule(self, budget: float | None = None) -> Schedule:
        """The schedule for ``budget`` (default: the recommended one, else the largest); ScheduleError otherwise."""
        if budget is None:
            budget = self.recommended_budget if self.recommended_budget is not None else max(self.schedules)
        if not is_budget(budget) or budget not in self.schedules:
            raise ScheduleError(
                f"{self.path or 'this schedule file'} has no schedule for budget {budget!r}; it has budgets "
                f"{', '.join(map(str, self.budgets))} (full forwards per generation)")
        return self.schedules[budget]


def check_steps(steps_list, steps: int, what) -> tuple[int, ...]:
    """A component's computed steps as a sorted tuple; ``what(message)`` raises when they are not distinct step
    indices in ``[0, steps)``."""
    if not isinstance(steps_list, (list, tuple)) or not steps_list:
        what("expected a non-empty list of the step indices that compute")
    if not all(is_int(s) for s in steps_list):
        what("every entry must be an integer step index")
    bad = [s for s in steps_list if not 0 <= s < steps]
    if bad:
        what(f"step {bad[0]} is outside 0..{steps - 1} (the schedule is for {steps} steps)")
    if len(set(steps_list)) != len(steps_list):
        what("lists a step twice")
    return tuple(sorted(steps_list))


def parse(doc: dict, source: str = "<document>") -> ScheduleConfig:
    """Validate a decoded schedule document (format and version already checked by the caller)."""
    model = model_section(doc, source)
    steps = doc.get("steps")
    if not is_int(steps) or steps < 1:
        fail(source, "steps", "expected the number of denoising steps the schedules are for (an integer >= 1)")
    forecast = forecast_of(doc.get("forecast"), source, "forecast")
    entries = doc.get("schedules")
    if not isinstance(entries, list) or not entries:
        fail(source, "schedules", "missing or empty: expected at least one {budget, components} entry")
    schedules: dict[int, Schedule] = {}
    names = None
    for i, entry in enumerate(entries):
        where = f"schedules.{i}"
        if not isinstance(entry, dict):
            fail(source, where, "expected an object")
        budget = entry.get("budget")
        if not is_budget(budget):
            fail(source, f"{where}.budget", "expected the number of full forwards, a positive multiple of 0.5")
        budget = int(budget) if float(budget).is_integer() else float(budget)
        if budget in schedules:
            fail(source, f"{where}.budget", f"budget {budget} appears twice")
        comps = entry.get("components")
        if not isinstance(comps, dict) or not comps:
            fail(source, f"{where}.components", "missing or empty: expected {component: [computed steps]}")
        if names is None:
            names = list(comps)
        elif sorted(comps) != sorted(names):
            fail(source, f"{where}.components", f"lists {sorted(comps)}, the first schedule {sorted(names)}")
        masks = {}
        for name, listed in comps.items():
            def bad(what, _where=f"{where}.components.{name}"):
                fail(source, _where, what)

            masks[name] = check_steps(listed, steps, bad)
        search = entry.get("search")
        if search is not None and search not in SEARCHES:
            fail(source, f"{where}.search", f"{search!r} is not one of {', '.join(SEARCHES)}")
        error = entry.get("error") or {}
        if not isinstance(error, dict):
            fail(source, f"{where}.error", "expected an object of metrics")
        own = forecast_of(entry["forecast"], source, f"{where}.forecast") if "forecast" in entry else None
        cond_only = {}
        listed = entry.get("cond_only") or {}
        if not isinstance(listed, dict) or not set(listed) <= set(masks):
            fail(source, f"{where}.cond_only", "expected {component: [steps]} for components the schedule lists")
        for name, steps_list in listed.items():
            def bad(what, _where=f"{where}.cond_only.{name}"):
                fail(source, _where, what)

            cond_only[name] = check_steps(steps_list, steps, bad) if steps_list else ()
            if set(cond_only[name]) & set(masks[name]):
                bad("lists a step the schedule computes in full")
        if any(cond_only.values()) and not isinstance(own or forecast, CfgForecast):
            fail(source, f"{where}.cond_only", "cond-only steps need a cfg forecast (kind cfg) for this budget")
        schedules[budget] = Schedule(budget, masks, search, dict(error), own, cond_only)
    recommended = doc.get("recommended")
    recommended_budget = None
    if recommended is not None:
        if not isinstance(recommended, dict) or not is_budget(recommended.get("budget")):
            fail(source, "recommended", "expected {\"budget\": B} with B one of the schedules' budgets")
        recommended_budget = recommended["budget"]
        if recommended_budget not in schedules:
            fail(source, "recommended.budget",
                  f"{recommended_budget} is not among the schedules' budgets ({', '.join(map(str, sorted(schedules)))})")
    check_with_jsonschema(doc, source)
    return ScheduleConfig(
        steps=steps,
        schedules=schedules,
        forecast=forecast,
        recommended_budget=recommended_budget,
        **header_fields(doc, model, source),
    )


def schedule_document_for(pipe, *, steps: int, schedules: dict, forecast: ForecastSpec | None = None,
                          recommended: int | None = None, search: str | None = None) -> dict:
    """A schedule document for ``pipe`` (a pipeline or its transformer), written in code rather than searched:
    ``schedules`` is ``{budget: {component: [computed steps]}}``; ``forecast`` what the steps in between add
    (default: reuse, order 0). ``parse`` it to apply it, as ``calib fit --method schedule`` does with candidates."""
    from datetime import datetime, timezone

    identity = model_identity(transformer_of(pipe))
    entries = []
    for budget, comps in schedules.items():
        entry = {"budget": int(budget) if float(budget).is_integer() else float(budget),
                 "components": {name: sorted(int(s) for s in listed)
                                                         for name, listed in comps.items()}}
        if search is not None:
            entry["search"] = search
        entries.append(entry)
    doc = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "method": METHOD,
        "calib_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"class": identity["class"], "config_hash": identity["config_hash"]},
        "calibration": {},
        "steps": int(steps),
        "forecast": (forecast or Forecast()).as_json(),
        "schedules": entries,
    }
    if recommended is not None:
        doc["recommended"] = {"budget": int(recommended) if float(recommended).is_integer() else float(recommended)}
    return doc


def config_for(pipe, schedule: dict, *, steps: int, forecast: ForecastSpec | None = None,
               cond_only: dict | None = None) -> ScheduleConfig:
    """A :class:`ScheduleConfig` of one budget for ``pipe``'s model, from ``schedule = {component: [computed steps]}``
    and ``cond_only = {component: [steps]}`` (steps where only the conditional branch of batched guidance computes,
    with a :class:`~calib.runtime.bases.CfgForecast`): what ``apply_schedule`` applies, built without a document. The
    budget is the full forwards it spends, a cond-only step counting half."""
    check_count("steps", steps)
    check_forecast(forecast)
    for what, table in (("schedule", schedule), ("cond_only", cond_only if cond_only is not None else {"": []})):
        if not isinstance(table, dict) or not table or not all(isinstance(k, str) for k in table):
            raise OptionError(f"the {what} must be {{component: [steps]}}, got {table!r}"[:200])
    masks, partial = {}, {}
    for name, listed in schedule.items():
        def bad(what, _name=name):
            raise ScheduleError(f"apply_schedule: {_name}: {what}")

        masks[name] = check_steps(listed, steps, bad)
        extra = (cond_only or {}).get(name) or ()
        if extra:
            partial[name] = check_steps(list(extra), steps, bad)
            if set(partial[name]) & set(masks[name]):
                bad("a cond-only step is also computed in full")
    if set(cond_only or {}) - set(masks):
        raise OptionError(f"cond_only names components the schedule does not: {sorted(set(cond_only) - set(masks))}")
    if partial and not isinstance(forecast, CfgForecast):
        raise OptionError("cond-only steps need forecast=CfgForecast(...): the conditional output and the guidance "
                          "difference")
    budget = sum(len(m) for m in masks.values()) + 0.5 * sum(len(m) for m in partial.values())
    budget = int(budget) if float(budget).is_integer() else budget
    identity = model_identity(transformer_of(pipe))
    return ScheduleConfig(model_class=identity["class"], steps=steps,
                          schedules={budget: Schedule(budget, masks, cond_only=partial)},
                          forecast=forecast or Forecast(), config_hash=identity["config_hash"])


@dataclass(frozen=True)
class ScheduleOptions(CommonOptions):
    """``apply(pipe, schedule_config, ...)``'s keywords (and :class:`~calib.runtime.options.CommonOptions`'):
    ``budget`` which of the file's schedules runs (full forwards per generation; default: the recommended one);
    ``forecast`` what the skipped steps get, replacing the file's; ``sigmas`` a bare transformer's noise levels, for a
    forecast in σ. ``num_steps`` must be the schedule's step count (the default)."""

    budget: int | None = None
    forecast: ForecastSpec | None = None
    sigmas: Sequence[float] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_budget(self.budget)
        check_forecast(self.forecast)
        object.__setattr__(self, "sigmas", as_sigmas(self.sigmas))


def install(pipe, config: ScheduleConfig, options: ScheduleOptions) -> CacheHandle:
    """A step mask per component, from the schedule of ``options.budget``, with the file's (or ``options``')
    forecast on the steps in between."""
    schedule = config.schedule(options.budget)
    source = config.path or "this schedule"
    if options.num_steps is not None and options.num_steps != config.steps:
        raise StepCountError(f"{source} was searched for {config.steps} steps, not num_steps={options.num_steps}")
    forecast = options.forecast or schedule.forecast or config.forecast
    if any(schedule.cond_only.values()) and not isinstance(forecast, CfgForecast):
        raise OptionError(f"budget {schedule.budget} of {source} has cond-only steps: its forecast= must be a "
                          "CfgForecast (the conditional output and the guidance difference)")
    components, scheduler = components_of(pipe, config, "one schedule per expert")
    if not steps_with(scheduler) and forecast.variable == "sigma" and options.sigmas is None:
        raise OptionValueError(
            "the forecast is in the noise level (variable sigma), which a bare transformer cannot know: pass"
            " sigmas=scheduler.sigmas (after set_timesteps), or apply to the pipeline")
    engine = Engine(scheduler, num_steps=config.steps, sigmas=options.sigmas)
    handle = CacheHandle(config, engine, budget=schedule.budget,
                         signature=SignatureCheck(config, strict=options.strict, what="schedule", pipe=pipe))
    with handle.installing():
        for name, transformer in components:
            check_model(handle, name, transformer, options.allow_model_mismatch)
            adapter = get_adapter(transformer, options.modulation_module)
            mask = StepMask(schedule.components[name], config.steps, source,
                            cond_only=schedule.cond_only.get(name, ()))
            handle.attach(name, transformer, adapter, policy=mask, forecast=forecast)
        handle.watch(scheduler)
    return handle


SCHEDULE = RuntimeMethod(METHOD, ScheduleConfig, ScheduleOptions, parse, install)
