"""``calib fit --method schedule``: which steps to compute, chosen by measuring what forecasting the others costs.

The gate of TeaCache decides on line from a proxy (the indicator change); this method decides offline, from the
error of the *final* output, measured with the runtime in the loop (the idea of LeMiCa, arXiv 2511.00090, and
DPCache: a graph of measured segment errors searched by dynamic programming).

* **Segments.** A segment ``(i, j)`` computes steps ``i`` and ``j`` and forecasts the block stack's residual on
  ``i+1 .. j-1`` (``calib.runtime.Forecast``: Newton extrapolation from the last computed steps); every other step
  computes. Its cost is the latent rel-L1 of the final output against the uncached output of the same prompts and
  seed, measured by a real generation per segment, for gaps ``j - i`` of 2 to ``G`` (a gap of 1 skips nothing and
  costs 0). That is about ``steps x (G - 1)`` generations per seed and forecast candidate; the prompts of one seed
  run as one batch.
* **Search.** A schedule for a budget ``B`` (full forwards per stream; the first and the last step always compute)
  is a path ``0 = s_0 < s_1 < ... < s_{B-1} = N-1`` with gaps at most ``G``. :func:`min_sum_path` minimises the
  sum of its segments' costs, :func:`minimax_path` the largest cost, then the next largest, ... (lexicographic
  minimax). Both are exact dynamic programmes over (budget, step); the tests check them against brute force.
* **Choice.** The costs add up only approximately (a forecast's history depends on the steps before it), so both
  searches' schedules, for each forecast candidate, run on held-out prompts of the trace; the better one is kept
  per budget, and the forecast candidate with the lower error over all budgets is the file's forecast.

The measured segment errors are kept beside the output (``OUT.segments.json``, written atomically after every few
segments), so an interrupted run resumes, and ``--shard I/N`` measures only shard ``I`` of the segment list into
``OUT.segments.rankI-of-N.json`` (docs/cluster.md); a run without ``--shard`` then reads every shard's file,
measures what is missing and writes the schedule file.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import calib.runtime as cr
from calib._io import write_bytes
from calib.coeffs.document import cfg_layout
from calib.errors import CalibError
from calib.methods.base import Method, OptionSpec
from calib.methods.cost_model import wall_target_fraction
from calib.runtime import Forecast
from calib.runtime.schedule import parse as parse_schedule_document
from calib.trace.generate import Generator

METHOD = "schedule"
DEFAULT_GAP = 6
DEFAULT_ORDERS = (1, 2)
DEFAULT_VARIABLE = "step"
VARIABLES = ("step", "sigma", "timestep")
SEARCHES = ("min_sum", "minimax")
SEGMENTS_FORMAT = "calib-schedule-segments"
SEGMENTS_VERSION = 1
SAVE_EVERY_SECONDS = 5.0
RECOMMENDED_COMPUTE_FRACTION = 0.5
ERROR_METRIC = ("mean over the held-out prompts x seeds of the relative L1 change of the final latents against the "
                "uncached generation of the same prompt and seed")


# ---------------------------------------------------------------------------------------------------------------
# the search (pure python: exact dynamic programmes over measured segment costs)
# ---------------------------------------------------------------------------------------------------------------
def segments(n: int, gap: int, component_of=None) -> list[tuple[int, int]]:
    """The segments to measure: ``(i, j)`` with ``2 <= j - i <= gap`` inside ``n`` steps. ``component_of`` (step ->
    component, for two-expert models) keeps the forecast steps ``i+1 .. j-1`` with the expert that computed ``i``:
    an expert cannot extrapolate a residual the other one produced."""
    out = []
    for i in range(n - 1):
        for j in range(i + 2, min(n - 1, i + gap) + 1):
            if component_of is not None and any(component_of[k] != component_of[i] for k in range(i + 1, j)):
                continue
            out.append((i, j))
    return out


def _edges(n: int, costs: dict) -> dict[int, list[tuple[int, float]]]:
    """Predecessors of each step: adjacent steps (cost 0: nothing is forecast) and the measured segments."""
    into: dict[int, list[tuple[int, float]]] = {j: [(j - 1, 0.0)] for j in range(1, n)}
    for (i, j), c in costs.items():
        if j - i >= 2 and 0 <= i < j < n and math.isfinite(c):
            into[j].append((i, float(c)))
    return into


def min_sum_path(n: int, costs: dict, budget: int) -> list[int] | None:
    """The computed steps (``budget`` of them, first and last included) minimising the sum of the segment costs,
    or None when no path of that length exists. Ties go to the path found first (smaller predecessors)."""
    if n < 2 or not 2 <= budget <= n:
        return [0] if n == 1 and budget == 1 else None
    into = _edges(n, costs)
    inf = float("inf")
    # best[b][j]: least cost of a path from step 0 to step j through b computed steps
    best = [[inf] * n for _ in range(budget + 1)]
    back = [[-1] * n for _ in range(budget + 1)]
    best[1][0] = 0.0
    for b in range(2, budget + 1):
        for j in range(1, n):
            for i, c in into[j]:
                v = best[b - 1][i] + c
                if v < best[b][j]:
                    best[b][j], back[b][j] = v, i
    if best[budget][n - 1] == inf:
        return None
    return _walk_back(back, budget, n - 1)


def _merge_desc(values: tuple, c: float) -> tuple:
    """``values`` (sorted largest first) with ``c`` inserted in place."""
    k = 0
    while k < len(values) and values[k] >= c:
        k += 1
    return values[:k] + (c,) + values[k:]


def minimax_path(n: int, costs: dict, budget: int) -> list[int] | None:
    """The computed steps minimising the largest segment cost, then the second largest, and so on (lexicographic
    minimax over the costs sorted largest first), or None when no path of that length exists.

    Dynamic programming is exact here: every path into (b, j) has b - 1 segments, and inserting the same cost
    into two sorted tuples of equal length keeps their lexicographic order."""
    if n < 2 or not 2 <= budget <= n:
        return [0] if n == 1 and budget == 1 else None
    into = _edges(n, costs)
    best: list[list[tuple | None]] = [[None] * n for _ in range(budget + 1)]
    back = [[-1] * n for _ in range(budget + 1)]
    best[1][0] = ()
    for b in range(2, budget + 1):
        for j in range(1, n):
            for i, c in into[j]:
                prev = best[b - 1][i]
                if prev is None:
                    continue
                v = _merge_desc(prev, c)
                if best[b][j] is None or v < best[b][j]:
                    best[b][j], back[b][j] = v, i
    if best[budget][n - 1] is None:
        return None
    return _walk_back(back, budget, n - 1)


def _walk_back(back, budget: int, last: int) -> list[int]:
    path = [last]
    b, j = budget, last
    while b > 1:
        j = back[b][j]
        path.append(j)
        b -= 1
    return path[::-1]


def path_costs(path: list[int], costs: dict) -> list[float]:
    """The cost of each segment of ``path`` (0 for adjacent steps)."""
    return [0.0 if j - i == 1 else float(costs[(i, j)]) for i, j in zip(path, path[1:])]


def feasible_budgets(n: int, gap: int, costs: dict) -> list[int]:
    """Budgets for which a path exists with the measured segments (from the fewest computed steps up to all)."""
    return [b for b in range(2, n + 1) if min_sum_path(n, costs, b) is not None] if n >= 2 else []


# ---------------------------------------------------------------------------------------------------------------
# measurement: real generations with the runtime in the loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A forecast the segments are measured with (``calib.runtime.Forecast``'s fields)."""

    order: int
    variable: str = DEFAULT_VARIABLE

    @property
    def key(self) -> str:
        return f"newton-o{self.order}-{self.variable}"

    def document(self) -> dict:
        return {"kind": "newton", "order": self.order, "variable": self.variable}

    def runtime(self):
        return Forecast(order=self.order, variable=self.variable)


@dataclass
class Setup:
    """What the generations of a schedule fit are: model, steps, guidance, the prompts split into the ones the
    segments are measured on and the held-out ones the searched schedules are compared on, and the seeds."""

    source: str
    steps: int
    guidance: float
    measure_prompts: list
    holdout_prompts: list
    seeds: list
    components: list
    component_of: list | None  # step -> component for two-expert models, else None
    pipeline_kwargs: dict = field(default_factory=dict)

    def key(self, gap: int, candidates) -> dict:
        """What a segment file must match to be reused."""
        return {"source": self.source, "steps": self.steps, "guidance": self.guidance,
                "prompts": list(self.measure_prompts), "seeds": list(self.seeds), "gap": gap,
                "forecasts": [c.key for c in candidates], "pipeline_kwargs": self.pipeline_kwargs}


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
    batch: ``error(computed, candidate)`` is the mean per-sample latent rel-L1 over ``jobs``."""

    def __init__(self, pipe, jobs: list[tuple[tuple, int]], *, steps: int, guidance: float,
                 pipeline_kwargs: dict | None = None):
        self.pipe = pipe
        self.jobs = jobs
        self.steps = steps
        self._generator = Generator(pipe, steps=steps, guidance=guidance, pipeline_kwargs=pipeline_kwargs,
                                    output_type="latent", purpose="a schedule fit")
        self.references = {job: self._generate(job) for job in jobs}
        self.generations = 0

    def close(self) -> None:
        self._generator.close()

    def _generate(self, job) -> torch.Tensor:
        """The batch's final latents (rows: the job's prompts)."""
        prompts, seed = job
        return self._generator(list(prompts), seed).latents

    def error(self, computed: dict, candidate: Candidate) -> float:
        errors = []
        handle = cr.apply_schedule(self.pipe, computed, steps=self.steps, forecast=candidate.runtime())
        try:
            for job in self.jobs:
                out = self._generate(job)
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


# ---------------------------------------------------------------------------------------------------------------
# the segment file: resumable, shardable
# ---------------------------------------------------------------------------------------------------------------
def segments_path(out: Path, shard: tuple[int, int] | None = None) -> Path:
    out = Path(out)
    stem = out.name[: -len(".json")] if out.name.lower().endswith(".json") else out.name
    tail = "" if shard is None else f".rank{shard[0]}-of-{shard[1]}"
    return out.with_name(f"{stem}.segments{tail}.json")


def _segment_key(i: int, j: int) -> str:
    return f"{i}-{j}"


def read_segment_file(path: Path, key: dict) -> dict[str, dict[str, float]]:
    """{forecast key: {"i-j": error}} of a segment file made for ``key``; a file for other settings is refused."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CalibError(f"{path}: cannot read the segment errors ({type(exc).__name__}); delete it to measure "
                         "them again") from None
    if not isinstance(doc, dict) or doc.get("format") != SEGMENTS_FORMAT:
        raise CalibError(f"{path}: not a calib schedule segment file")
    if doc.get("key") != key:
        theirs = doc.get("key") or {}
        differ = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
        raise CalibError(f"{path}: segment errors measured with other settings ({', '.join(differ)} differ); "
                         "pass --overwrite to measure anew, or use another --out")
    errors = doc.get("errors") or {}
    return {str(f): {str(s): float(v) for s, v in seg.items()} for f, seg in errors.items()}


def write_segment_file(path: Path, key: dict, errors: dict) -> None:
    doc = {"format": SEGMENTS_FORMAT, "version": SEGMENTS_VERSION, "key": key,
           "errors": {f: dict(sorted(seg.items(), key=lambda kv: tuple(int(x) for x in kv[0].split("-"))))
                      for f, seg in errors.items()}}
    write_bytes(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8"))


def _shard_files(out: Path) -> list[Path]:
    base = segments_path(out)
    stem = base.name[: -len(".json")]
    return sorted(p for p in base.parent.glob(f"{stem}.rank*-of-*.json"))


# ---------------------------------------------------------------------------------------------------------------
# the fit
# ---------------------------------------------------------------------------------------------------------------
def setup_from_traces(trace_set, *, prompts=None, seeds=None) -> Setup:
    """The generations a schedule fit runs, from the trace: model source, steps, guidance, prompts, seeds."""
    trajectories = trace_set.trajectories
    if not trajectories:
        raise CalibError("the traces hold no trajectories")
    source = (trace_set.model_info or {}).get("source")
    if not source:
        raise CalibError("the traces do not record the model's source (--model of calib trace); cannot rerun it")
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


def _jobs(prompts: list, seeds: list, batch: int) -> list[tuple[tuple, int]]:
    jobs = []
    for seed in seeds:
        for k in range(0, len(prompts), batch):
            jobs.append((tuple(prompts[k:k + batch]), int(seed)))
    return jobs


def measure_segments(pipe, setup: Setup, *, gap: int, candidates, out: Path, shard=None, overwrite=False,
                     batch: int = 16, echo=print, progress: bool = True) -> dict[str, dict[str, float]]:
    """Measure (or read back) the segment errors of every candidate forecast; returns {forecast: {"i-j": err}}."""
    key = setup.key(gap, candidates)
    own = segments_path(out, shard)
    errors: dict[str, dict[str, float]] = {c.key: {} for c in candidates}
    if overwrite:
        for p in [segments_path(out), *_shard_files(out)]:
            if p.exists():
                p.unlink()
    sources = [own] + ([] if shard is not None else [p for p in _shard_files(out)])
    for path in sources:
        if path.exists():
            for f, seg in read_segment_file(path, key).items():
                errors.setdefault(f, {}).update(seg)
    todo = [(c, seg) for c in candidates for seg in segments(setup.steps, gap, setup.component_of)]
    if shard is not None:
        todo = todo[shard[0]::shard[1]]
    total = len(todo)
    todo = [(c, seg) for c, seg in todo if _segment_key(*seg) not in errors[c.key]]
    jobs = _jobs(setup.measure_prompts, setup.seeds, batch)
    gens = len(todo) * len(jobs)
    where = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    echo(f"schedule fit{where}: {total} segments (gaps 2..{gap} in {setup.steps} steps x {len(candidates)} "
         f"forecast{'s' if len(candidates) != 1 else ''}), {total - len(todo)} already measured in {own.name}; "
         f"{len(todo)} to measure = {gens} batched generations of {len(setup.measure_prompts)} prompt(s) "
         f"({len(jobs)} per segment: seeds {setup.seeds})")
    if not todo:
        return errors
    runner = Runner(pipe, jobs, steps=setup.steps, guidance=setup.guidance, pipeline_kwargs=setup.pipeline_kwargs)
    mine = {c.key: {} for c in candidates}
    if own.exists():
        for f, seg in read_segment_file(own, key).items():
            mine.setdefault(f, {}).update(seg)
    bar = _progress(len(todo), "segments") if progress else None
    last = time.monotonic()
    try:
        for c, (i, j) in todo:
            err = runner.error(computed_steps(setup.steps, range(i + 1, j), setup.components, setup.component_of), c)
            errors[c.key][_segment_key(i, j)] = mine[c.key][_segment_key(i, j)] = err
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{c.key} {i}->{j}: {err:.4f}")
            if time.monotonic() - last >= SAVE_EVERY_SECONDS:
                write_segment_file(own, key, mine)
                last = time.monotonic()
    finally:
        write_segment_file(own, key, mine)  # Ctrl-C keeps what was measured
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


def _costs(seg: dict[str, float]) -> dict[tuple[int, int], float]:
    return {tuple(int(x) for x in k.split("-")): v for k, v in seg.items()}


def search_schedules(n: int, costs: dict, budgets) -> dict[int, dict[str, list[int]]]:
    """{budget: {"min_sum": path, "minimax": path}} for every budget a path exists for."""
    out = {}
    for b in budgets:
        found = {"min_sum": min_sum_path(n, costs, b), "minimax": minimax_path(n, costs, b)}
        if found["min_sum"] is not None:
            out[b] = found
    return out


def choose(pipe, setup: Setup, errors: dict, candidates, *, batch: int = 16, echo=print,
           progress: bool = True, budgets=None) -> dict:
    """Run every searched schedule on the held-out prompts; keep, per budget, the better search, and the forecast
    with the lower error summed over the budgets. Returns the document's ``schedules`` and what was compared."""
    n = setup.steps
    jobs = _jobs(setup.holdout_prompts, setup.seeds, batch)
    runner = Runner(pipe, jobs, steps=n, guidance=setup.guidance, pipeline_kwargs=setup.pipeline_kwargs)
    per_candidate = {}
    try:
        wanted = range(2, n + 1) if budgets is None else sorted({int(b) for b in budgets})
        plans = {c.key: search_schedules(n, _costs(errors[c.key]), wanted) for c in candidates}
        if not any(plans.values()):
            raise CalibError(f"no schedule of {list(wanted)} computed steps fits gaps up to the measured ones; "
                             "raise --gap")
        runs = sum(len({tuple(p) for p in found.values()}) for plan in plans.values() for found in plan.values())
        echo(f"comparing the searched schedules on {len(setup.holdout_prompts)} held-out prompt(s) x seeds "
             f"{setup.seeds}: {runs} schedules, {runs * len(jobs)} batched generations")
        bar = _progress(runs, "schedules") if progress else None
        for c in candidates:
            costs = _costs(errors[c.key])
            rows = {}
            for b, found in plans[c.key].items():
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
            per_candidate[c.key] = rows
        if bar is not None:
            bar.close()
    finally:
        runner.close()
    score = {k: float(np.mean([math.log(max(r["error"]["holdout_latent_rel_l1"], 1e-9)) for r in rows.values()
                               if r["budget"] < n] or [0.0]))
             for k, rows in per_candidate.items()}
    best = min(candidates, key=lambda c: (score[c.key], c.order))
    return {"forecast": best, "rows": per_candidate[best.key], "scores": score, "all": per_candidate}


def build_document(pipe, setup: Setup, chosen: dict, *, gap: int, trace_files) -> dict:
    """The schedule coefficient document (``method: schedule``), through the runtime's own builder."""
    n = setup.steps
    rows = dict(sorted(chosen["rows"].items()))
    recommended = recommended_budget(n, list(rows))
    doc = cr.schedule_document_for(
        pipe, steps=n, forecast=chosen["forecast"].runtime(), recommended=recommended,
        schedules={b: split_by_component(r["path"], setup.components, setup.component_of) for b, r in rows.items()})
    for entry in doc["schedules"]:
        row = rows[entry["budget"]]
        entry["search"] = row["search"]
        entry["error"] = row["error"]
    doc["forecast"]["selection"] = {"held_out_geometric_mean_error": {k: round(math.exp(v), 6)
                                                                      for k, v in chosen["scores"].items()}}
    doc["model"]["source"] = setup.source
    doc["calibration"] = {
        "method": "measured segment errors + dynamic programming (min-sum and lexicographic minimax), the better "
                  "schedule per budget on held-out prompts",
        "trace_files": [str(f) for f in trace_files],
        "steps": [n],
        "guidance": [setup.guidance],
        "num_prompts": len(setup.measure_prompts) + len(setup.holdout_prompts),
        "num_seeds": len(setup.seeds),
        "gap": gap,
        "measured_prompts": list(setup.measure_prompts),
        "holdout_prompts": list(setup.holdout_prompts),
        "seeds": list(setup.seeds),
        "error_metric": ERROR_METRIC,
        "forecast_candidates": {k: round(math.exp(v), 6) for k, v in chosen["scores"].items()},
        "forecast_choice": f"{chosen['forecast'].key}: lowest geometric-mean held-out error over the budgets "
                           f"below {n}",
    }
    return doc


def recommended_budget(n: int, budgets: list[int]) -> int:
    """The largest budget computing at most half the steps (2x fewer forwards), else the smallest there is."""
    ok = [b for b in budgets if b <= RECOMMENDED_COMPUTE_FRACTION * n + 1e-9]
    return max(ok) if ok else min(budgets)


def parse_candidates(orders: str | None, variable: str | None) -> list[Candidate]:
    text = orders if orders is not None else ",".join(str(o) for o in DEFAULT_ORDERS)
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise CalibError(f"--forecast-order {text!r}: expected orders 0, 1 or 2, comma-separated") from None
    if not values or any(v not in (0, 1, 2) for v in values):
        raise CalibError(f"--forecast-order {text!r}: expected orders 0, 1 or 2, comma-separated")
    variable = DEFAULT_VARIABLE if variable in (None, "auto") else variable  # "auto": calib fit's default
    if variable not in VARIABLES:
        raise CalibError(f"--forecast-variable {variable!r}: choose from {', '.join(VARIABLES)}")
    return [Candidate(o, variable) for o in dict.fromkeys(values)]


def fit_schedule(pipe, trace_set, *, out: Path, gap: int | None = DEFAULT_GAP, candidates=None, shard=None,
                 overwrite: bool = False, seeds=None, prompts=None, batch: int = 16, echo=print,
                 progress: bool = True, budgets=None) -> dict | None:
    """Measure, search, compare, and return the schedule document (None for a ``shard`` run, which only measures).
    ``budgets``: only these (default: every budget the gaps allow); ``gap`` None: :data:`DEFAULT_GAP`."""
    gap = DEFAULT_GAP if gap is None else gap
    if not isinstance(gap, int) or gap < 2:
        raise CalibError(f"--gap must be an integer >= 2, got {gap!r}")
    candidates = list(candidates or parse_candidates(None, None))
    setup = setup_from_traces(trace_set, prompts=prompts, seeds=seeds)
    if setup.steps < 3:
        raise CalibError(f"a schedule needs at least 3 steps (the first and the last always compute); the traces "
                         f"have {setup.steps}")
    errors = measure_segments(pipe, setup, gap=gap, candidates=candidates, out=out, shard=shard,
                              overwrite=overwrite, batch=batch, echo=echo, progress=progress)
    if shard is not None:
        echo(f"shard {shard[0]}/{shard[1]} measured; once every shard is done, run the same command without --shard "
             "to search and write the schedule file")
        return None
    missing = [(c.key, s) for c in candidates for s in segments(setup.steps, gap, setup.component_of)
               if _segment_key(*s) not in errors.get(c.key, {})]
    if missing:  # pragma: no cover - measure_segments measures everything without a shard
        raise CalibError(f"{len(missing)} segments are not measured yet")
    chosen = choose(pipe, setup, errors, candidates, batch=batch, echo=echo, progress=progress, budgets=budgets)
    doc = build_document(pipe, setup, chosen, gap=gap, trace_files=getattr(trace_set, "files", []) or [])
    layout = cfg_layout(trace_set.trajectories)  # cache-dit counts one call per branch as a step unless told
    if layout is not None:
        doc["calibration"]["cfg"] = layout
    return doc


def format_schedules(doc: dict) -> str:
    n = doc["steps"]
    lines = [f"{'budget':>6}  {'computed':>8}  {'fwd x':>6}  {'search':>7}  {'held-out err':>12}  steps"]
    rec = (doc.get("recommended") or {}).get("budget")
    for s in doc["schedules"]:
        steps = sorted({x for v in s["components"].values() for x in v})
        mark = "  <- recommended" if s["budget"] == rec else ""
        lines.append(f"{s['budget']:>6}  {s['budget'] / n:>8.1%}  {n / s['budget']:>5.2f}x  {s['search']:>7}  "
                     f"{s['error']['holdout_latent_rel_l1']:>12.5f}  {','.join(map(str, steps))}{mark}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# calib tune on a schedule file: pick the budget
# ---------------------------------------------------------------------------------------------------------------
def choose_budget(doc: dict, target, cost_model: dict | None = None) -> tuple[dict, bool]:
    """``(schedule entry, reached)`` for a ``calib tune`` target: ``--speedup S`` / ``--compute-fraction F`` take
    the largest budget computing at most ``1/S`` (``F``) of the steps (with ``cost_model``, ``--speedup`` is
    wall-clock); ``--max-error E`` the smallest budget whose held-out error is at most ``E``."""
    n = doc["steps"]
    entries = sorted(doc["schedules"], key=lambda e: e["budget"])
    if target.kind == "max_error":
        ok = [e for e in entries if (e.get("error") or {}).get("holdout_latent_rel_l1", math.inf) <= target.value]
        return (ok[0], True) if ok else (entries[-1], False)
    fraction = target.fraction
    if cost_model is not None and target.kind == "speedup":
        fraction = wall_target_fraction(cost_model, target.value)
    ok = [e for e in entries if e["budget"] / n <= fraction + 1e-12]
    return (ok[-1], True) if ok else (entries[0], False)


def check_section(doc: dict, source: str) -> None:
    """Step lists within 0..steps-1, budgets distinct, the recommended one among them: the runtime's own parser."""
    parse_schedule_document(doc, source)


ENTRY = Method(
    name=METHOD,
    summary="searched static schedules of computed steps, a forecast in between",
    section="schedules",
    options=(
        OptionSpec("--gap", int, DEFAULT_GAP, "longest run of forecast steps measured"),
        OptionSpec("--forecast-order", str, None, "forecast orders to compare (K[,K])"),
        OptionSpec("--forecast-variable", str, "auto", "step, sigma or timestep"),
        OptionSpec("--seeds", str, None, "seeds to generate"),
        OptionSpec("--shard", str, None, "measure one shard I/N"),
        OptionSpec("--overwrite", bool, False, "measure every segment anew"),
        OptionSpec("--device", str, None, "torch device"),
    ),
    fit=fit_schedule,
    needs_pipeline=True,
    tune=choose_budget,
    tune_targets=("speedup", "compute_fraction", "max_error"),
    accepts_costs=True,
    check_section=check_section,
    runtime="schedule",
)
