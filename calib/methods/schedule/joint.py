"""The joint search behind ``calib fit --method schedule|auto``: which steps compute — in full, or (batched
classifier-free guidance) only the conditional branch — and what the other steps get — which quantity is forecast
(the *target*: the transformer's output, the last block's hidden states, the stack residual) and how (the *basis*:
Newton orders, the guidance difference apart) — chosen together, by measuring the error of the final output of
the served pipeline call.

Why measured: the error a forecast leaves in the final latents depends on where the computed steps fall in ways a
proxy does not see (on the built-in models moving one computed step changes the final error by a third, and the
best masks are not those a per-segment proxy ranks first). So candidates are *generated* cheaply — evenly spread
masks ending at each of the last steps (the last steps may be forecast), TaylorSeer's every-k masks with each
warm-up, and for batched guidance masks that trade full steps for twice as many cond-only steps at the same cost —
then *measured*: every candidate's forecasts on the calibration prompts, a local search (each computed step moved
by one or two) from the best few, and the final choice among the best on held-out calibration prompts. Every
measurement is a generation with calib's runtime in the loop, against the uncached generation of the same prompt
and seed; all of them are kept in a log (``log``), so an interrupted fit resumes where it stopped.

This module does no file I/O: the fit job opens the log (:class:`calib.store.search_log.SearchLog`) and the search
reads and extends a dictionary of it through a ``save`` callback.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, MutableMapping

import numpy as np
import torch

import calib.runtime as cr
from calib.errors import CalibError
from calib.methods.schedule.measure import per_sample_rel_l1, split_by_component
from calib.runtime.bases import CfgForecast
from calib.trace.generate import Generator

TOP = 3  # candidates the local search starts from, and finalists compared on held-out prompts
MAX_LOCAL_EVALS = 60  # measured generations per local search
SAVE_EVERY_SECONDS = 5.0
DIVERGED = 1e6  # the error recorded for a forecast that did not stay finite (the log holds finite numbers)


# ---------------------------------------------------------------------------------------------------------------
# what is searched
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForecastChoice:
    """A named forecast candidate (the runtime's forecast setting)."""

    name: str
    spec: cr.ForecastSpec


def forecast_candidates(*, cfg_batched: bool, targets: Iterable[str] = ("output", "hidden", "residual"),
                        orders: Iterable[int] = (1, 2), variable: str = "step") -> list[ForecastChoice]:
    """Newton orders for each target; with batched guidance also the output forecast in guidance coordinates (the
    conditional output and the difference, each its own order)."""
    orders = tuple(orders)
    out = [ForecastChoice(f"{t}-newton{o}", cr.Forecast(o, variable, target=t)) for t in targets for o in orders]
    if cfg_batched:
        out += [ForecastChoice(f"cfg-cond{a}-diff{b}", CfgForecast(cr.Forecast(a, variable, target="output"),
                                                                  cr.Forecast(b, variable, target="output")))
                for a in orders for b in orders]
    return out


@dataclass(frozen=True)
class Plan:
    """The steps that compute in full and those that compute the conditional branch only (batched guidance)."""

    full: tuple[int, ...]
    cond_only: tuple[int, ...] = ()

    @property
    def cost(self) -> float:
        """Full forwards per generation, a cond-only step counting half."""
        return len(self.full) + 0.5 * len(self.cond_only)

    def key(self) -> str:
        text = ",".join(map(str, self.full))
        return text + ("|" + ",".join(map(str, self.cond_only)) if self.cond_only else "")

    @classmethod
    def of(cls, full: Iterable[int], cond_only: Iterable[int] = ()) -> "Plan":
        full = tuple(sorted(set(int(s) for s in full)))
        return cls(full, tuple(sorted(set(int(s) for s in cond_only) - set(full))))


def budget_for(fraction: float, steps: int, *, halves: bool) -> float:
    """The budget (full forwards, a multiple of one half where cond-only steps are possible) nearest ``fraction`` of
    ``steps``, at least 2 (the first step and one more)."""
    exact = fraction * steps
    budget = round(exact * 2) / 2 if halves else float(round(exact))
    return max(2.0, budget)


def spread(count: int, last: int, first: int = 0) -> list[int]:
    """``count`` steps spread evenly from ``first`` to ``last``."""
    if count <= 1:
        return [first][:count]
    return sorted({int(round(x)) for x in np.linspace(first, last, count)})


def taylorseer_masks(steps: int, count: int) -> list[list[int]]:
    """Every-k masks after a warm-up (TaylorSeer's schedule), those computing exactly ``count`` steps."""
    out = []
    for interval in range(2, 8):
        for before in range(1, steps):
            mask = [s for s in range(steps) if s < before or (s - before - 1) % interval == 0]
            if len(mask) == count and mask not in out:
                out.append(mask)
                break
    return out


def with_required(mask, required) -> list[int]:
    """``mask`` with the ``required`` steps and as many steps as before: the mask's other steps are added back
    farthest-first from those already in, so the mask stays spread out."""
    out = set(required)
    rest = [s for s in mask if s not in out]
    while rest and len(out) < len(set(mask)):
        far = max(rest, key=lambda s: (min(abs(s - t) for t in out), -s))
        out.add(far)
        rest.remove(far)
    return sorted(out)


def starting_plans(steps: int, budget: float, *, cond_only: bool, required=(0,)) -> list[Plan]:
    """Where the search starts for ``budget``: see the module docstring. ``required``: steps that must compute in
    full (the first step, and a two-expert model's first step of each expert)."""
    required = sorted(set(required))
    plans: list[Plan] = []

    def add(full, partial=()):
        full = with_required(full, required)
        plan = Plan.of(full, partial)
        if plan.cost == budget and plan not in plans and all(0 <= s < steps for s in plan.full + plan.cond_only):
            plans.append(plan)

    whole = int(math.floor(budget))
    for last in (steps - 1, steps - 2, steps - 3):
        add(spread(whole, last))
    for mask in taylorseer_masks(steps, whole):
        add(mask)
    if cond_only:
        for n_full in range(whole, max(1, len(required)) - 1, -1):  # full steps traded for twice as many halves
            n_half = int(round(2 * (budget - n_full)))
            if n_half <= 0 or n_full + n_half > steps:
                continue
            for last in (steps - 2, steps - 1):
                full = spread(n_full, last)
                rest = [s for s in range(steps) if s not in full]
                pick = [rest[int(i)] for i in np.round(np.linspace(0, len(rest) - 1, n_half))]
                add(full, pick)
    return plans


def neighbours(plan: Plan, steps: int, *, required=(0,)) -> Iterable[Plan]:
    """Each computed step (full or cond-only) moved by one or two, the required steps kept."""
    required = set(required)
    for which in ("full", "cond_only"):
        current = list(getattr(plan, which))
        other = set(plan.cond_only if which == "full" else plan.full)
        for i, s in enumerate(current):
            if which == "full" and s in required:
                continue
            for d in (-1, 1, -2, 2):
                t = s + d
                if not 0 <= t < steps or t in current or t in other or t in required:
                    continue
                moved = current[:i] + [t] + current[i + 1:]
                yield Plan.of(moved, plan.cond_only) if which == "full" else Plan.of(plan.full, moved)


# ---------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------
class PlanRunner:
    """Generations of one split of prompts x seeds (the prompts of a seed as one batch) with a plan applied, against
    the uncached generations: :meth:`error` is the mean per-sample latent rel-L1. Measured errors are kept in
    ``log`` under ``split``, so a plan is measured once (also across runs)."""

    def __init__(self, pipe, jobs: list[tuple[tuple, int]], *, steps: int, guidance: float, pipeline_kwargs: dict,
                 components: list, component_of, log: MutableMapping, split: str, save: Callable[[], None]):
        self.pipe = pipe
        self.jobs = jobs
        self.steps = steps
        self.components = components
        self.component_of = component_of
        self.log = log
        self.split = split
        self.save = save
        self._generator = Generator(pipe, steps=steps, guidance=guidance, pipeline_kwargs=pipeline_kwargs,
                                    output_type="latent", purpose="a schedule search")
        self._references = None
        self._saved = time.monotonic()
        self.measured = 0

    def close(self) -> None:
        self._generator.close()

    def generate(self, job) -> torch.Tensor:
        """The final latents of one ``(prompts, seed)`` job, with whatever cache is applied now."""
        prompts, seed = job
        return self._generator(list(prompts), seed).latents

    def measure(self, apply_cache) -> tuple[float, dict]:
        """(mean per-sample latent rel-L1, ``handle.stats()``) of every job with the cache ``apply_cache()``
        applies (it returns the handle), against the uncached references; not logged."""
        references = self.references
        errors = []
        handle = apply_cache()
        try:
            for job in self.jobs:
                errors.extend(per_sample_rel_l1(references[job], self.generate(job)))
            stats = handle.stats()
        finally:
            handle.remove()
        return float(np.mean(errors)), stats

    @property
    def references(self):
        if self._references is None:
            self._references = {job: self.generate(job) for job in self.jobs}
        return self._references

    def key(self, plan: Plan, forecast: ForecastChoice) -> str:
        return f"{self.split}:{forecast.name}:{plan.key()}"

    def error(self, plan: Plan, forecast: ForecastChoice) -> float:
        key = self.key(plan, forecast)
        if key in self.log:
            return self.log[key]
        if len(plan.full) + len(plan.cond_only) == 0:
            raise CalibError("a plan computes no step")
        full = split_by_component(plan.full, self.components, self.component_of)
        partial = split_by_component(plan.cond_only, self.components, self.component_of) if plan.cond_only else None
        value, _ = self.measure(lambda: cr.apply_schedule(self.pipe, full, steps=self.steps, forecast=forecast.spec,
                                                          cond_only=partial))
        if not math.isfinite(value):
            value = DIVERGED
        self.log[key] = value
        self.measured += 1
        if time.monotonic() - self._saved >= SAVE_EVERY_SECONDS:
            self.save()
            self._saved = time.monotonic()
        return value


# ---------------------------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Found:
    """One budget's result: the plan and forecast kept, its errors, and what was compared."""

    budget: float
    plan: Plan
    forecast: ForecastChoice
    measure_error: float
    holdout_error: float
    finalists: list  # [{plan, forecast, measure, holdout}]
    measured: int

    def entry(self) -> dict:
        return {"plan": self.plan.key(), "forecast": self.forecast.name,
                "measure_latent_rel_l1": round(self.measure_error, 6),
                "holdout_latent_rel_l1": round(self.holdout_error, 6), "finalists": self.finalists,
                "generations_measured": self.measured}


def local_starts(scored: list, top: int) -> list:
    """Where the local searches start: the best measured (plan, forecast) of each way of spending the budget (the
    number of full steps: a cond-only mix and a full-step plan do not turn into each other by moving steps), the
    ``top`` best of those, filled up with the next best plans when there are fewer kinds."""
    best_of_kind: dict[int, tuple] = {}
    for row in scored:
        best_of_kind.setdefault(len(row[1].full), row)
    starts = sorted(best_of_kind.values(), key=lambda r: r[0])[:top]
    for row in scored:
        if len(starts) >= top:
            break
        if all(row[1] != s[1] for s in starts):
            starts.append(row)
    return starts


def search_budget(measure: PlanRunner, holdout: PlanRunner, budget: float, forecasts: list[ForecastChoice], *,
                  cond_only: bool, required=(0,), max_local: int = MAX_LOCAL_EVALS, top: int = TOP,
                  tick: Callable[[str], None] | None = None) -> Found:
    """Search ``budget`` (see the module docstring); ``tick(text)`` is called after each measurement."""
    steps = measure.steps
    plans = starting_plans(steps, budget, cond_only=cond_only, required=required)
    if not plans:
        raise CalibError(f"no plan of {budget:g} full forwards fits {steps} steps")
    before = measure.measured
    cfg = [f for f in forecasts if isinstance(f.spec, CfgForecast)]
    scored = []
    for plan in plans:
        for forecast in forecasts:
            if plan.cond_only and forecast not in cfg:
                continue  # a cond-only step completes the output in guidance coordinates only
            scored.append((measure.error(plan, forecast), plan, forecast))
            if tick:
                tick(f"{budget:g}: start {forecast.name}")
    scored.sort(key=lambda r: r[0])
    # what this search has looked at (not what the log holds): a resumed run spends its evaluations exactly as the
    # interrupted one did, so it takes the same path and measures nothing the log has
    seen = {(plan, forecast.name) for _, plan, forecast in scored}
    results = []
    for error, plan, forecast in local_starts(scored, top):
        spent = 0
        improved = True
        while improved and spent < max_local:
            improved = False
            for candidate in neighbours(plan, steps, required=required):
                if spent >= max_local:
                    break
                fresh = (candidate, forecast.name) not in seen
                seen.add((candidate, forecast.name))
                value = measure.error(candidate, forecast)
                spent += fresh
                if tick and fresh:
                    tick(f"{budget:g}: local {forecast.name} {value:.5f}")
                if value < error - 1e-12:
                    error, plan, improved = value, candidate, True
                    break
        # the forecast again on the plan the search settled on
        for other in forecasts:
            if plan.cond_only and other not in cfg:
                continue
            value = measure.error(plan, other)
            if value < error:
                error, forecast = value, other
        results.append((error, plan, forecast))
    finalists = []
    for error, plan, forecast in sorted(set(results), key=lambda r: r[0]):
        finalists.append({"plan": plan.key(), "forecast": forecast.name, "measure": round(error, 6),
                          "holdout": round(holdout.error(plan, forecast), 6)})
    best = min(finalists, key=lambda f: (f["holdout"], f["measure"]))
    plan = next(p for e, p, f in results if p.key() == best["plan"] and f.name == best["forecast"])
    forecast = next(f for f in forecasts if f.name == best["forecast"])
    return Found(budget, plan, forecast, best["measure"], best["holdout"], finalists,
                 measure.measured - before)
