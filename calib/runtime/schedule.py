"""Static schedules (method ``schedule``): which steps compute, fixed in advance per budget and component, with the
file's forecast on the steps in between (torch and the standard library only).

    import calib.runtime as cr
    config = cr.load("coeffs/digits.schedule.json")    # a ScheduleConfig
    handle = cr.apply(pipe, config, budget=15)         # default: the recommended budget
    images = pipe("a handwritten 7", num_inference_steps=config.steps).images

The runtime applies it with the same hooks as TeaCache (:mod:`calib.runtime.api`): only the decider differs, a mask
instead of the gate. A schedule is searched for one step count; another is refused (:class:`StepCountError`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from calib import __version__
from calib.adapters import model_identity
from calib.runtime.document import FORMAT, SCHEMA_VERSION, _check_with_jsonschema, _fail, _model_section, forecast_of
from calib.runtime.errors import ScheduleError
from calib.runtime.forecast import Forecast

METHOD = "schedule"
SEARCHES = ("min_sum", "minimax")


@dataclass(frozen=True)
class Schedule:
    """One budget's mask: per component, the step indices that compute."""

    budget: int
    components: dict[str, tuple[int, ...]]
    search: str | None = None
    error: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleConfig:
    """What the runtime needs from a schedule file."""

    model_class: str
    steps: int
    schedules: dict[int, Schedule]  # by budget
    forecast: Forecast = Forecast()
    recommended_budget: int | None = None
    config_hash: str | None = None
    source: str | None = None
    adapter: str | None = None
    calibration: dict = field(default_factory=dict)
    path: str | None = None
    document: dict = field(default_factory=dict, repr=False)
    method: str = METHOD

    @property
    def components(self) -> tuple[str, ...]:
        """The component names every schedule lists (``transformer``, and ``transformer_2`` for two experts)."""
        return tuple(next(iter(self.schedules.values())).components)

    @property
    def recommended_threshold(self) -> None:
        """A schedule has no threshold (code written for coefficient files asks; ``apply`` takes ``budget=``)."""
        return None

    @property
    def budgets(self) -> list[int]:
        return sorted(self.schedules)

    def schedule(self, budget: int | None = None) -> Schedule:
        """The schedule for ``budget`` (default: the recommended one, else the largest); ScheduleError otherwise."""
        if budget is None:
            budget = self.recommended_budget if self.recommended_budget is not None else max(self.schedules)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget not in self.schedules:
            raise ScheduleError(
                f"{self.path or 'this schedule file'} has no schedule for budget {budget!r}; it has budgets "
                f"{', '.join(map(str, self.budgets))} (full forwards per generation)")
        return self.schedules[budget]


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_steps(steps_list, steps: int, what) -> tuple[int, ...]:
    """A component's computed steps as a sorted tuple; ``what(message)`` raises when they are not distinct step
    indices in ``[0, steps)``."""
    if not isinstance(steps_list, (list, tuple)) or not steps_list:
        what("expected a non-empty list of the step indices that compute")
    if not all(_int(s) for s in steps_list):
        what("every entry must be an integer step index")
    bad = [s for s in steps_list if not 0 <= s < steps]
    if bad:
        what(f"step {bad[0]} is outside 0..{steps - 1} (the schedule is for {steps} steps)")
    if len(set(steps_list)) != len(steps_list):
        what("lists a step twice")
    return tuple(sorted(steps_list))


def parse(doc: dict, source: str = "<document>") -> ScheduleConfig:
    """Validate a decoded schedule document (format and version already checked by the caller)."""
    model = _model_section(doc, source)
    steps = doc.get("steps")
    if not _int(steps) or steps < 1:
        _fail(source, "steps", "expected the number of denoising steps the schedules are for (an integer >= 1)")
    forecast = forecast_of(doc.get("forecast"), source, "forecast")
    entries = doc.get("schedules")
    if not isinstance(entries, list) or not entries:
        _fail(source, "schedules", "missing or empty: expected at least one {budget, components} entry")
    schedules: dict[int, Schedule] = {}
    names = None
    for i, entry in enumerate(entries):
        where = f"schedules.{i}"
        if not isinstance(entry, dict):
            _fail(source, where, "expected an object")
        budget = entry.get("budget")
        if not _int(budget) or budget < 1:
            _fail(source, f"{where}.budget", "expected the number of full forwards, an integer >= 1")
        if budget in schedules:
            _fail(source, f"{where}.budget", f"budget {budget} appears twice")
        comps = entry.get("components")
        if not isinstance(comps, dict) or not comps:
            _fail(source, f"{where}.components", "missing or empty: expected {component: [computed steps]}")
        if names is None:
            names = list(comps)
        elif sorted(comps) != sorted(names):
            _fail(source, f"{where}.components", f"lists {sorted(comps)}, the first schedule {sorted(names)}")
        masks = {}
        for name, listed in comps.items():
            def bad(what, _where=f"{where}.components.{name}"):
                _fail(source, _where, what)

            masks[name] = check_steps(listed, steps, bad)
        search = entry.get("search")
        if search is not None and search not in SEARCHES:
            _fail(source, f"{where}.search", f"{search!r} is not one of {', '.join(SEARCHES)}")
        error = entry.get("error") or {}
        if not isinstance(error, dict):
            _fail(source, f"{where}.error", "expected an object of metrics")
        schedules[budget] = Schedule(budget, masks, search, dict(error))
    recommended = doc.get("recommended")
    recommended_budget = None
    if recommended is not None:
        if not isinstance(recommended, dict) or not _int(recommended.get("budget")):
            _fail(source, "recommended", "expected {\"budget\": B} with B one of the schedules' budgets")
        recommended_budget = recommended["budget"]
        if recommended_budget not in schedules:
            _fail(source, "recommended.budget",
                  f"{recommended_budget} is not among the schedules' budgets ({', '.join(map(str, sorted(schedules)))})")
    _check_with_jsonschema(doc, source)
    return ScheduleConfig(
        model_class=model["class"],
        steps=steps,
        schedules=schedules,
        forecast=forecast,
        recommended_budget=recommended_budget,
        config_hash=model.get("config_hash"),
        source=model.get("source"),
        adapter=model.get("adapter"),
        calibration=dict(doc.get("calibration") or {}),
        document=doc,
    )


def schedule_document_for(target, *, steps: int, schedules: dict, forecast: Forecast | None = None,
                          recommended: int | None = None, search: str | None = None) -> dict:
    """A schedule document for ``target`` (a pipeline or its transformer), written in code rather than searched:
    ``schedules`` is ``{budget: {component: [computed steps]}}``; ``forecast`` what the steps in between add
    (default: reuse, order 0). ``parse`` it to apply it, as ``calib fit --method schedule`` does with candidates."""
    from datetime import datetime, timezone

    import torch

    transformer = target
    if not isinstance(target, torch.nn.Module) or hasattr(target, "scheduler"):
        transformer = getattr(target, "transformer", None)
        if not isinstance(transformer, torch.nn.Module):
            raise ValueError(f"{type(target).__name__} is neither a transformer nor a pipeline with one")
    identity = model_identity(transformer)
    entries = []
    for budget, comps in schedules.items():
        entry = {"budget": int(budget), "components": {name: sorted(int(s) for s in listed)
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
        doc["recommended"] = {"budget": int(recommended)}
    return doc
