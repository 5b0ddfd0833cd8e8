"""The schedule fit's measurements: real generations with the runtime in the loop.

A segment ``(i, j)`` computes steps ``i`` and ``j`` and forecasts the block stack's residual on ``i+1 .. j-1``
(:class:`calib.runtime.Forecast`); every other step computes. Its cost is the latent rel-L1 of the final output
against the uncached output of the same prompts and seed (:func:`measure_segments`). The searched schedules then run
on held-out prompts (:func:`choose`). The segment errors are kept in the :class:`~calib.store.segments.SegmentStore`
the job opened, so an interrupted run resumes and shards measure their share.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import calib.runtime as cr
from calib.errors import CalibError
from calib.methods.schedule.paths import path_costs, search_schedules, segment_costs, segments
from calib.runtime import Forecast
from calib.store.segments import SegmentStore, segment_key
from calib.trace.generate import Generator

SEARCHES = ("min_sum", "minimax")
SAVE_EVERY_SECONDS = 5.0


def forecast_key(forecast: Forecast) -> str:
    """How a segment file names the forecast its errors were measured with."""
    return f"newton-o{forecast.order}-{forecast.variable}"


@dataclass
class Setup:
    """What the generations of a schedule fit are: model, steps, guidance, the prompts split into the ones the
    segments are measured on and the held-out ones the searched schedules are compared on, and the seeds."""

    source: str  # the model the generations run (a --model value)
    steps: int
    guidance: float
    measure_prompts: list
    holdout_prompts: list
    seeds: list
    components: list
    component_of: list | None  # step -> component for two-expert models, else None
    pipeline_kwargs: dict = field(default_factory=dict)

    def key(self, gap: int, forecasts) -> dict:
        """What a segment file must match to be reused."""
        return {"source": self.source, "steps": self.steps, "guidance": self.guidance,
                "prompts": list(self.measure_prompts), "seeds": list(self.seeds), "gap": gap,
                "forecasts": [forecast_key(f) for f in forecasts], "pipeline_kwargs": self.pipeline_kwargs}


def split_prompts(prompts: list[str]) -> tuple[list[str], list[str]]:
    """(measured, held out): every third prompt (a third, at least one) is held out for the comparison of the
    searched schedules; with a single prompt both are it (then the held-out check only varies the seed)."""
    prompts = list(prompts)
    if len(prompts) < 2:
        return prompts, prompts
    held = max(1, round(len(prompts) / 3))
    picks = sorted({min(len(prompts) - 1, int((k + 0.5) * len(prompts) / held)) for k in range(held)})
    return [p for i, p in enumerate(prompts) if i not in picks], [p for i, p in enumerate(prompts) if i in picks]


class Runner:
    """Generates batches of prompts for one seed with a schedule applied and measures them against the uncached
    batch: ``error(computed, forecast)`` is the mean per-sample latent rel-L1 over ``jobs``."""

    def __init__(self, pipe, jobs: list[tuple[tuple, int]], *, steps: int, guidance: float,
                 pipeline_kwargs: dict | None = None):
        self.pipe = pipe
        self.jobs = jobs
        self.steps = steps
        self._generator = Generator(pipe, steps=steps, guidance=guidance, pipeline_kwargs=pipeline_kwargs,
                                    output_type="latent", purpose="a schedule fit")
        self.references = {job: self.generate(job) for job in jobs}
        self.generations = 0

    def close(self) -> None:
        self._generator.close()

    def generate(self, job) -> torch.Tensor:
        """The batch's final latents (rows: the job's prompts)."""
        prompts, seed = job
        return self._generator(list(prompts), seed).latents

    def error(self, computed: dict, forecast: Forecast) -> float:
        """Mean per-sample latent rel-L1 with ``computed`` ({component: steps}) applied, ``forecast`` between."""
        errors = []
        handle = cr.apply_schedule(self.pipe, computed, steps=self.steps, forecast=forecast)
        try:
            for job in self.jobs:
                out = self.generate(job)
                self.generations += 1
                errors.extend(per_sample_rel_l1(self.references[job], out))
        finally:
            handle.remove()
        return float(np.mean(errors))


def per_sample_rel_l1(reference: torch.Tensor, test: torch.Tensor) -> list[float]:
    """Relative L1 change of each batch row (dim 0) of the final latents."""
    ref = reference.reshape(reference.shape[0], -1).double()
    diff = (test.reshape(test.shape[0], -1).double() - ref).abs().mean(dim=1)
    scale = ref.abs().mean(dim=1).clamp_min(1e-12)
    return [float(v) for v in (diff / scale)]


def computed_steps(n: int, skipped: range, components: list, component_of) -> dict[str, list[int]]:
    """{component: the steps it computes} when every step but ``skipped`` computes."""
    keep = [s for s in range(n) if s not in skipped]
    return split_by_component(keep, components, component_of)


def split_by_component(steps: list[int], components: list, component_of) -> dict[str, list[int]]:
    if component_of is None:
        return {components[0]: list(steps)}
    return {c: [s for s in steps if component_of[s] == c] for c in components}


def setup_from_traces(trace_set, source: str, *, prompts=None, seeds=None) -> Setup:
    """The generations a schedule fit runs with the model ``source`` (the job chose it: calib.jobs.fit), from the
    trace: steps, guidance, prompts, seeds."""
    trajectories = trace_set.trajectories
    if not trajectories:
        raise CalibError("the traces hold no trajectories")
    steps = sorted({t.steps for t in trajectories})
    guidance = sorted({t.guidance for t in trajectories})
    if len(steps) != 1 or len(guidance) != 1:
        raise CalibError(f"a schedule is fitted for one step count and guidance; the traces have steps {steps}, "
                         f"guidance {guidance} — trace them apart")
    traced = list(dict.fromkeys(t.prompt for t in trajectories))
    prompts = traced if prompts is None else list(prompts)
    traced_seeds = sorted({t.seed for t in trajectories})
    seeds = traced_seeds if seeds is None else [int(s) for s in seeds]
    components = sorted({t.component for t in trajectories})
    component_of = None
    if len(components) > 1:
        owner: dict[int, str] = {}
        for t in trajectories:
            for s in t.step_index:
                owner.setdefault(int(s), t.component)
        if set(owner) != set(range(steps[0])):
            raise CalibError("the traces do not say which expert runs every step; trace full generations")
        component_of = [owner[s] for s in range(steps[0])]
    measure, holdout = split_prompts(prompts)
    return Setup(source=source, steps=steps[0], guidance=guidance[0], measure_prompts=measure,
                 holdout_prompts=holdout, seeds=seeds, components=components, component_of=component_of)


def batches(prompts: list, seeds: list, batch: int) -> list[tuple[tuple, int]]:
    """The generations as ``(prompts, seed)`` batches of at most ``batch`` prompts."""
    jobs = []
    for seed in seeds:
        for k in range(0, len(prompts), batch):
            jobs.append((tuple(prompts[k:k + batch]), int(seed)))
    return jobs


def measure_segments(pipe, setup: Setup, *, gap: int, forecasts, store: SegmentStore, overwrite=False,
                     batch: int = 16, echo=print, progress: bool = True) -> dict[str, dict[str, float]]:
    """Measure (or read back from ``store``) the segment errors of every forecast; returns {forecast key:
    {"i-j": err}}. With the store's shard, only that shard of the segment list is measured."""
    key = setup.key(gap, forecasts)
    shard = store.shard
    if overwrite:
        store.clear()
    errors: dict[str, dict[str, float]] = {forecast_key(c): {} for c in forecasts}
    for f, seg in store.read(key).items():
        errors.setdefault(f, {}).update(seg)
    todo = [(c, seg) for c in forecasts for seg in segments(setup.steps, gap, setup.component_of)]
    if shard is not None:
        todo = todo[shard[0]::shard[1]]
    total = len(todo)
    todo = [(c, seg) for c, seg in todo if segment_key(*seg) not in errors[forecast_key(c)]]
    jobs = batches(setup.measure_prompts, setup.seeds, batch)
    gens = len(todo) * len(jobs)
    where = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    echo(f"schedule fit{where}: {total} segments (gaps 2..{gap} in {setup.steps} steps x {len(forecasts)} "
         f"forecast{'s' if len(forecasts) != 1 else ''}), {total - len(todo)} already measured in {store.path.name}; "
         f"{len(todo)} to measure = {gens} batched generations of {len(setup.measure_prompts)} prompt(s) "
         f"({len(jobs)} per segment: seeds {setup.seeds})")
    if not todo:
        return errors
    runner = Runner(pipe, jobs, steps=setup.steps, guidance=setup.guidance, pipeline_kwargs=setup.pipeline_kwargs)
    mine = {forecast_key(c): {} for c in forecasts}
    for f, seg in store.read_own(key).items():
        mine.setdefault(f, {}).update(seg)
    bar = _progress(len(todo), "segments") if progress else None
    last = time.monotonic()
    try:
        for c, (i, j) in todo:
            err = runner.error(computed_steps(setup.steps, range(i + 1, j), setup.components, setup.component_of), c)
            errors[forecast_key(c)][segment_key(i, j)] = mine[forecast_key(c)][segment_key(i, j)] = err
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{forecast_key(c)} {i}->{j}: {err:.4f}")
            if time.monotonic() - last >= SAVE_EVERY_SECONDS:
                store.write(key, mine)
                last = time.monotonic()
    finally:
        store.write(key, mine)  # Ctrl-C keeps what was measured
        if bar is not None:
            bar.close()
        runner.close()
    return errors


def _progress(total: int, unit: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit=unit, desc="schedule", leave=False)


def choose(pipe, setup: Setup, errors: dict, forecasts, *, batch: int = 16, echo=print,
           progress: bool = True, budgets=None) -> dict:
    """Run every searched schedule on the held-out prompts; keep, per budget, the better search, and the forecast
    with the lower error summed over the budgets. Returns the document's ``schedules`` and what was compared."""
    n = setup.steps
    jobs = batches(setup.holdout_prompts, setup.seeds, batch)
    runner = Runner(pipe, jobs, steps=n, guidance=setup.guidance, pipeline_kwargs=setup.pipeline_kwargs)
    per_candidate = {}
    try:
        wanted = range(2, n + 1) if budgets is None else sorted({int(b) for b in budgets})
        plans = {forecast_key(c): search_schedules(n, segment_costs(errors[forecast_key(c)]), wanted) for c in forecasts}
        if not any(plans.values()):
            raise CalibError(f"no schedule of {list(wanted)} computed steps fits gaps up to the measured ones; "
                             "raise --gap")
        runs = sum(len({tuple(p) for p in found.values()}) for plan in plans.values() for found in plan.values())
        echo(f"comparing the searched schedules on {len(setup.holdout_prompts)} held-out prompt(s) x seeds "
             f"{setup.seeds}: {runs} schedules, {runs * len(jobs)} batched generations")
        bar = _progress(runs, "schedules") if progress else None
        for c in forecasts:
            costs = segment_costs(errors[forecast_key(c)])
            rows = {}
            for b, found in plans[forecast_key(c)].items():
                measured: dict[tuple, float] = {}
                for search in SEARCHES:
                    path = tuple(found[search])
                    if path not in measured:
                        measured[path] = 0.0 if len(path) == n else runner.error(
                            split_by_component(list(path), setup.components, setup.component_of), c)
                        if bar is not None:
                            bar.update(1)
                pick = min(SEARCHES, key=lambda s: (measured[tuple(found[s])], SEARCHES.index(s)))
                path = found[pick]
                seg = path_costs(path, costs)
                rows[b] = {
                    "budget": b, "path": path, "search": pick,
                    "error": {"holdout_latent_rel_l1": round(measured[tuple(path)], 6),
                              "segment_sum": round(sum(seg), 6), "segment_max": round(max(seg, default=0.0), 6),
                              "searches": {s: round(measured[tuple(found[s])], 6) for s in SEARCHES},
                              "same_path": found["min_sum"] == found["minimax"]},
                }
            per_candidate[forecast_key(c)] = rows
        if bar is not None:
            bar.close()
    finally:
        runner.close()
    score = {k: float(np.mean([math.log(max(r["error"]["holdout_latent_rel_l1"], 1e-9)) for r in rows.values()
                               if r["budget"] < n] or [0.0]))
             for k, rows in per_candidate.items()}
    best = min(forecasts, key=lambda c: (score[forecast_key(c)], c.order))
    return {"forecast": best, "rows": per_candidate[forecast_key(best)], "scores": score, "all": per_candidate}
