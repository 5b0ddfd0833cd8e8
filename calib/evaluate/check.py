"""What ``calib check`` measures (calib.jobs.check turns it into a verdict): a few generations of a pipeline traced in
memory on held-out seeds, the calibration's rule replayed on them, and cached runs measured against the uncached
ones of the same prompt and seed.

Every number is kept per generation, so the job can judge a difference against the spread of the generations
(:func:`mean_and_error`) instead of a fixed tolerance.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import numpy as np

import calib.runtime as cr
from calib.evaluate.metrics import latent_rel_l1
from calib.methods.base import TuneGoal
from calib.methods.teacache.fit import collect_samples, forced_last_mask
from calib.methods.teacache.rescalers import indicator_series
from calib.methods.teacache.tune import find_threshold, replay_trajectories, rescalers_of
from calib.runtime import Forecast
from calib.store import TraceSet
from calib.trace.generate import Generator
from calib.runtime.signature import weights_digest
from calib.trace.recorder import Tracer, describe_model, pipeline_components

CHECK_SEED = 1000  # held-out seeds start here: calibration traces use small seeds (calib trace's default is 0,1)


def held_out_jobs(prompts: list[str], generations: int) -> list[tuple[str, int]]:
    """``generations`` (prompt, seed) pairs: prompts spread evenly over the list, each with its own held-out seed."""
    count = len(prompts)
    return [(prompts[(i * count) // generations if generations <= count else i % count], CHECK_SEED + i)
            for i in range(generations)]


def mean_and_error(values) -> tuple[float, float]:
    """``(mean, standard error of the mean)`` of per-generation values (error 0 for one value; NaN for none)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    if arr.size == 1:
        return float(arr[0]), 0.0
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size))


@dataclasses.dataclass
class Traced:
    """The checked generations: their trajectories (an in-memory trace set), the final latents of each uncached
    generation, and the seconds each took."""

    trace_set: TraceSet
    references: dict  # (prompt, seed) -> final latents of the uncached, traced generation
    seconds: list


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="gen", desc=desc, dynamic_ncols=True, disable=not progress)


def trace_generations(pipe, jobs, settings, *, source: str, modulation_module=None, progress: bool = True,
                      desc: str = "check: trace", after_first=None) -> Traced:
    """Trace ``jobs`` (prompt, seed) with ``settings`` (a :class:`calib.trace.TraceSettings`), in memory; the final
    latents come from the same generation (nothing generated twice). ``after_first(seconds)`` is called once the
    first generation is done (the job's time estimate)."""
    tracer = Tracer(pipe, modulation_module=modulation_module, record_blocks=False)
    final = Generator(pipe, steps=settings.steps, guidance=settings.guidance, purpose="calib check")
    trajectories, references, seconds = [], {}, []
    bar = _bar(len(jobs), desc, progress)
    try:
        with tracer:
            for prompt, seed in jobs:
                start = time.perf_counter()
                trajectories.extend(tracer.trace(prompt, seed, settings))
                seconds.append(time.perf_counter() - start)
                references[(prompt, seed)] = final.latest()
                if after_first is not None and len(seconds) == 1:
                    bar.clear()
                    after_first(seconds[0])
                bar.update(1)
    finally:
        bar.close()
        final.close()
    info = describe_model(pipe, source, tracer.adapter)
    return Traced(TraceSet(model_info=info, trajectories=trajectories, files=[], attrs=[]), references, seconds)


def cached_errors(pipe, config, traced: Traced, settings, *, threshold=None, budget=None, progress: bool = True,
                  desc: str = "check: cached", per_generation: dict | None = None) -> dict:
    """Each traced generation again with ``config`` applied (the gate at ``threshold`` or the schedule at ``budget``):
    per generation its final-latent rel-L1 against the uncached one and its fraction of full forwards, and the
    signature fields that differed (the runtime's own check, :class:`calib.runtime.signature.SignatureCheck`)."""
    generate = Generator(pipe, steps=settings.steps, guidance=settings.guidance,
                         pipeline_kwargs=settings.call_kwargs(), output_type="latent", purpose="calib check")
    errors, fractions, mismatches = [], [], {}
    bar = _bar(len(traced.references), desc, progress)
    try:
        for (prompt, seed), reference in traced.references.items():
            run_config = config
            options = {"budget": budget} if budget is not None else {"threshold": threshold}
            if per_generation is not None:  # (config, threshold) of this generation (a cross-fitted refit)
                run_config, chosen = per_generation[(prompt, seed)]
                options = {"threshold": chosen}
            with warnings.catch_warnings():  # the mismatches are reported by the check, not warned per generation
                warnings.simplefilter("ignore")
                handle = cr.apply(pipe, run_config, allow_model_mismatch=True, **options)
                try:
                    out = generate(prompt, seed)
                    stats = handle.stats()
                finally:
                    handle.remove()
            errors.append(latent_rel_l1(reference, out.latents))
            fractions.append(stats["computed"] / stats["steps"] if stats.get("steps") else float("nan"))
            for m in stats.get("signature", []):
                mismatches.setdefault((m["field"], m.get("component")), m)
            bar.update(1)
    finally:
        bar.close()
        generate.close()
    return {"errors": errors, "fractions": fractions, "signature": list(mismatches.values())}


def weights_digests(pipe) -> dict:
    """The sampled weights digest of each transformer of ``pipe``, as the tracer records it in ``model_info``."""
    return {name: weights_digest(module) for name, module in pipeline_components(pipe)}


def local_refit(trace_set, doc: dict) -> tuple[dict, object]:
    """A TeaCache document fitted on ``trace_set`` as ``calib fit`` fits one (the method's own fit, with the file's
    indicator, normalisation, degree and forecast, so only the data differs), and its runtime config."""
    from calib.methods.base import FitContext
    from calib.methods.teacache.method import fit as fit_teacache
    from calib.methods.teacache.options import TeacacheOptions

    comps = list(doc["components"].values())
    indicator = doc.get("indicator") or {}
    entry = next((c.get("forecast") for c in comps if c.get("forecast")), None) or {}
    order = int(entry.get("order") or 0) if entry.get("kind", "newton") == "newton" else 0
    options = TeacacheOptions(degree=str(max(int(c.get("degree") or 1) for c in comps)),
                              indicator=indicator.get("name", "modulated_input"),
                              normalization=indicator.get("normalization", "none"), bootstrap=0, plot=False,
                              forecast=str(order), forecast_variable=str(entry.get("variable") or "step"))
    with warnings.catch_warnings():  # the fit's advice (trace more prompts) is for calibrations, not this yardstick
        warnings.simplefilter("ignore")
        fitted = fit_teacache(trace_set, options, FitContext(echo=lambda *_: None, progress=False))
    return fitted.document, cr.parse(fitted.document)


def cross_fitted_refits(trace_set, doc: dict) -> dict:
    """What a refit for this call would give, as the yardstick of the file's error: for each checked generation, a
    :func:`local_refit` of the *other* generations (so no refit is measured on what it was fitted on, as a real
    calibration is not). ``{(prompt, seed): (document, config, the others' trace set)}``; raises CalibError when
    the others are too few to fit (a few-step call, two generations)."""
    keys = list(dict.fromkeys(_generation(t) for t in trace_set.trajectories))
    out = {}
    for key in keys:
        others = TraceSet(model_info=trace_set.model_info, files=[], attrs=[],
                          trajectories=[t for t in trace_set.trajectories if _generation(t) != key])
        document, config = local_refit(others, doc)
        out[key] = (document, config, others)
    return out


# -- the gate's rule on the traces (TeaCache files) ------------------------------------------------------------------
def _generation(traj) -> tuple:
    return (traj.prompt, traj.seed)


def replayed_fractions(trace_set, doc: dict, threshold: float) -> list[float]:
    """Per generation, the fraction of steps the file's gate computes at ``threshold`` (the runtime's own rule
    replayed on the traced indicator, as calib fit and calib tune replay it)."""
    rescalers, indicator, normalization = rescalers_of(doc)
    computed, total = {}, {}
    for traj, decisions in replay_trajectories(trace_set, rescalers, threshold, indicator=indicator,
                                               normalization=normalization):
        key = _generation(traj)
        computed[key] = computed.get(key, 0) + sum(decisions)
        total[key] = total.get(key, 0) + len(decisions)
    return [computed[k] / total[k] for k in total if total[k]]


def restoring_threshold(trace_set, doc: dict, fraction: float) -> tuple[float, float, bool]:
    """``(threshold, replayed fraction, reached)``: the smallest threshold whose replay on the traces computes at
    most ``fraction`` of steps (calib tune --compute-fraction on these traces)."""
    rescalers, indicator, normalization = rescalers_of(doc)
    row, reached = find_threshold(trace_set, rescalers, TuneGoal("compute_fraction", fraction), indicator=indicator,
                                  normalization=normalization)
    return float(row.threshold), float(row.compute_fraction), bool(reached)


def component_forecast(comp: dict) -> Forecast | None:
    """The forecast whose one-step error the component's rescaler maps (None: it maps the output change)."""
    entry = comp.get("forecast") or {}
    target = (entry.get("selection") or {}).get("rescaler_target")
    if target != "forecast_error" or entry.get("kind", "newton") != "newton" or not entry.get("order"):
        return None
    return Forecast(order=int(entry["order"]), variable=str(entry.get("variable", "step")))


def rescaler_fit(trace_set, doc: dict) -> dict:
    """How well the file's rescalers explain the traced changes: per generation the mean absolute error of the
    rescaled indicator against what it predicts (the output change, or the forecast's error where the fit mapped
    that), over the steps the gate decides, the file's held-out error (``cv_mae``) beside it, and the share of
    indicator values inside the domain the rescaler was fitted on."""
    rescalers, indicator, normalization = rescalers_of(doc)
    per_generation: dict[tuple, list] = {}  # generation -> [(predicted, traced), ...]
    inside = count = 0
    calibrated, calibrated_r2 = [], []
    for name, comp in doc["components"].items():
        metrics = comp.get("metrics") or {}
        if metrics.get("cv_mae") is not None:
            calibrated.append(float(metrics["cv_mae"]))
        if metrics.get("cv_r2") is not None:
            calibrated_r2.append(float(metrics["cv_r2"]))
        samples = collect_samples(trace_set, name, None, indicator, normalization,
                                  forecast=component_forecast(comp))
        if samples is None or len(samples.x) == 0:
            continue
        scale = np.where(np.isfinite(samples.scale), samples.scale, 1.0)
        rescaler = rescalers[name]
        predicted = np.array([s * rescaler(x / s) for x, s in zip(samples.x, scale)], dtype=np.float64)
        lo, hi = rescaler.domain if rescaler.domain is not None else (-math.inf, math.inf)
        rates = samples.x / scale
        inside += int(np.sum((rates >= lo) & (rates <= hi)))
        count += len(rates)
        for index, p, y in zip(samples.groups, predicted, samples.y):
            key = _generation(trace_set.trajectories[int(index)])
            per_generation.setdefault(key, []).append((float(p), float(y)))
    pairs = list(per_generation.values())
    maes = [float(np.mean([abs(p - y) for p, y in g])) for g in pairs]
    # R² over all points, and left out one generation at a time: its jackknife standard error
    r2 = _r2([pt for g in pairs for pt in g])
    left_out = [_r2([pt for j, g in enumerate(pairs) if j != i for pt in g]) for i in range(len(pairs))]
    n = len(left_out)
    r2_error = (math.sqrt((n - 1) / n * sum((v - np.mean(left_out)) ** 2 for v in left_out)) if n > 1
                else float("nan"))
    return {"mae": maes, "calibrated_mae": max(calibrated) if calibrated else None,
            "r2": r2, "r2_error": r2_error, "calibrated_r2": min(calibrated_r2) if calibrated_r2 else None,
            "in_domain": inside / count if count else None}


def _r2(pairs) -> float:
    if len(pairs) < 2:
        return float("nan")
    p, y = np.asarray(pairs, dtype=np.float64).T
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - p) ** 2)) / total if total > 0 else float("nan")


def curves(trace_set, doc: dict) -> dict:
    """Per step, over the traced trajectories: the indicator's mean change (the gate's input) and the rescaler's mean
    absolute error against what it predicts (the output change, or the forecast's error), on the steps the gate
    decides (entry 0 has no previous step; the forced last step is left out). None where no value is finite."""
    rescalers, indicator, normalization = rescalers_of(doc)
    xs, errors = [], []
    for traj in trace_set.trajectories:
        comp = doc["components"].get(traj.component)
        series = None if comp is None else indicator_series(traj, indicator, normalization, component_forecast(comp))
        if series is None:
            continue
        x, y, scale = (np.asarray(v, dtype=np.float64) for v in series)
        scale = np.where(np.isfinite(scale), scale, 1.0)
        rescaler = rescalers[traj.component]
        predicted = np.array([s * rescaler(v / s) if math.isfinite(v) else math.nan for v, s in zip(x, scale)])
        keep = ~forced_last_mask(traj, len(x))
        keep[0] = False
        xs.append(np.where(keep, x, np.nan))
        errors.append(np.where(keep, np.abs(predicted - y), np.nan))
    return {"indicator": _column_means(xs), "rescaler_error": _column_means(errors)}


def _column_means(rows) -> list:
    if not rows:
        return []
    width = min(len(r) for r in rows)
    stacked = np.stack([r[:width] for r in rows])
    return [float(np.mean(col[np.isfinite(col)])) if np.isfinite(col).any() else None for col in stacked.T]
