"""The cost model: what a computed and a skipped step cost in wall-clock time, measured on this machine.

A skipped step is not free (the pipeline, the embeddings before the block stack, the indicator and the output head
still run), so ``calib eval`` times the same runtime at its two extreme settings and interpolates between them
(:data:`~calib.methods.cost_model.COST_MODEL`); :func:`measure_generations` runs those timings interleaved with the evaluated
generations."""

from __future__ import annotations

import statistics

import calib.runtime as cr
from calib.evaluate.harness import compare_outputs, with_polynomial
from calib.methods.cost_model import COST_MODEL
from calib.methods.progress import Progress
from calib.trace.generate import Generator

COST_JOBS = 4  # generations (the first jobs) on which the cost model's two extreme settings are timed


def _extreme_configs(config):
    """The same runtime with constant rescalers: ``(every step computes, only the forced steps compute)`` at
    threshold 1 — the indicator and the decision run as in a real cached generation."""
    return with_polynomial(config, (1e30,)), with_polynomial(config, (0.0,))


def cost_model(timings: dict) -> dict:
    """The cost model (:data:`~calib.methods.cost_model.COST_MODEL`) from ``timings``: per probe job, the median
    seconds of the uncached generation (``base``), with every step computed (``full``) and with the fewest computed
    (``fewest``), and the fewest setting's fraction of full forwards (``fewest_fraction``)."""
    base = sum(timings["base"])
    full = sum(timings["full"]) / base
    fewest = sum(timings["fewest"]) / base
    return {"description": COST_MODEL, "jobs": len(timings["base"]), "ratio_all_computed": full,
            "ratio_fewest_computed": fewest, "fewest_fraction": float(timings["fewest_fraction"]),
            "seconds_uncached": base / len(timings["base"])}


def measure_generations(generate: Generator, config, thresholds, jobs, repeats, reader, echo) -> dict:
    """Uncached and cached generations of every job, interleaved, ``repeats`` times; quality from the first. The
    first :data:`COST_JOBS` jobs also run the cost model's two extreme settings (:func:`cost_model`). A progress bar
    counts every generation."""
    every, fewest = _extreme_configs(config)
    probe_jobs = jobs[:COST_JOBS]
    warmups = 1 + len(thresholds) + 2
    bar = Progress("calib eval", "generation",
                   total=warmups + repeats * (len(jobs) * (1 + len(thresholds)) + 2 * len(probe_jobs)))

    def uncached(job):
        out = generate(*job)
        bar.tick(f"uncached {job[0][:24]!r} seed {job[1]}")
        return out

    def cached(job, t, cfg=config):
        handle = cr.apply(generate.pipe, cfg, threshold=t)
        try:
            out = generate(*job)
            stats = handle.stats()
        finally:
            handle.remove()
        bar.tick(f"threshold {t:g} {job[0][:24]!r} seed {job[1]}")
        return out, stats

    with bar:
        # warm-up: the first calls pay for allocations and lazy initialisation
        uncached(jobs[0])
        for t in thresholds:
            cached(jobs[0], t)
        cached(jobs[0], 1.0, every)
        cached(jobs[0], 1.0, fewest)
        base = {}
        runs = {t: {} for t in thresholds}
        probes = {job: {"full": [], "fewest": [], "fewest_stats": None} for job in probe_jobs}
        for r in range(repeats):
            for job in jobs:
                ref = uncached(job)
                entry = base.setdefault(job, {"seconds": []})
                entry["seconds"].append(ref.seconds)
                if job in probes:
                    probes[job]["full"].append(cached(job, 1.0, every)[0].seconds)
                    out, stats = cached(job, 1.0, fewest)
                    probes[job]["fewest"].append(out.seconds)
                    probes[job]["fewest_stats"] = stats
                if r == 0:
                    entry["output"] = ref
                    if reader is not None:
                        entry["digit"] = reader(ref.planes)
                for t in thresholds:
                    out, stats = cached(job, t)
                    rec = runs[t].setdefault(job, {"seconds": []})
                    rec["seconds"].append(out.seconds)
                    if r == 0:
                        rec["stats"] = stats
                        rec["quality"] = compare_outputs(entry["output"], out, reader)
            bar.say(echo, f"  repeat {r + 1}/{repeats} done")
    costs = {
        "base": [statistics.median(base[j]["seconds"]) for j in probe_jobs],
        "full": [statistics.median(probes[j]["full"]) for j in probe_jobs],
        "fewest": [statistics.median(probes[j]["fewest"]) for j in probe_jobs],
        "fewest_fraction": (sum(probes[j]["fewest_stats"]["computed"] for j in probe_jobs)
                            / sum(probes[j]["fewest_stats"]["steps"] for j in probe_jobs)),
    }
    return {"base": base, "runs": runs, "costs": costs}
