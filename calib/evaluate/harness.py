"""The one generation harness: :class:`~calib.trace.generate.Generator` runs a prompt (or a batch of prompts) x seed
through a pipeline, timed, and keeps the final latents and the decoded output. ``calib eval``
(:mod:`calib.jobs.eval`), ``calib demo`` (:func:`compare_cached`), the frontier (:class:`Harness`,
:mod:`calib.evaluate.frontier`) and the schedule fit's segment runs all generate through it. :class:`Harness` adds
what the frontier's rows share: the uncached references, the :class:`ComputeMeter`, and the bisection over real
runs (:func:`search`, calib.methods.search.measured_search)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics

import numpy as np
import torch

import calib.runtime as cr
from calib.adapters import get_adapter
from calib.evaluate.metrics import latent_rel_l1, psnr, ssim
from calib.methods.search import measured_search
from calib.runtime import ComponentRescaler
from calib.trace.generate import Generator, Output, to_planes


def compare_outputs(reference: Output, test: Output, reader=None) -> dict:
    out = {
        "psnr": psnr(reference.planes, test.planes),
        "ssim": ssim(reference.planes, test.planes),
        "latent_rel_l1": latent_rel_l1(reference.latents, test.latents),
    }
    if reader is not None:
        out["digit"] = reader(test.planes)
    return out


def with_polynomial(config, coefficients):
    """A runtime config with every component's rescaler replaced by the constant-or-polynomial ``coefficients``
    (and no recommended threshold): the cost model's extreme settings and the uncalibrated frontier baselines."""
    comps = {name: ComponentRescaler(tuple(float(c) for c in coefficients), None) for name in config.components}
    return dataclasses.replace(config, components=comps, recommended_threshold=None)


def runtime_install(pipe, config, threshold=None, forecast=None, budget=None):
    """``install() -> undo``: calib's runtime on ``pipe`` (a gate at ``threshold`` or a schedule at ``budget``)."""
    def install():
        if budget is not None:  # a schedule file
            handle = cr.apply(pipe, config, budget=budget)
        else:
            handle = cr.apply(pipe, config, threshold=threshold, forecast=forecast)
        return handle.remove

    return install


def compare_cached(pipe, config, threshold, prompts, *, steps, guidance, seed, repeats=3, forecast=None,
                   budget=None):
    """Uncached and cached generations of the same prompts (one batch) and seed, timed interleaved ``repeats``
    times after a warm-up; returns the median times, the latent error and the cached run's ``handle.stats()``."""
    generate = Generator(pipe, steps=steps, guidance=guidance, output_type="latent")
    plain_times, cached_times = [], []
    handle = None
    try:
        generate(prompts, seed)  # warm-up: first calls pay for allocations
        for _ in range(repeats):
            base = generate(prompts, seed)
            plain_times.append(base.seconds)
            if budget is not None:  # a schedule file
                handle = cr.apply(pipe, config, budget=budget)
            else:
                handle = cr.apply(pipe, config, threshold=threshold, forecast=forecast)
            cached = generate(prompts, seed)
            cached_times.append(cached.seconds)
            stats = handle.stats()
            handle.remove()
            handle = None
    finally:
        if handle is not None:
            handle.remove()
        generate.close()
    return {
        "speedup": statistics.median(plain_times) / statistics.median(cached_times),
        "plain_seconds": statistics.median(plain_times),
        "cached_seconds": statistics.median(cached_times),
        "latent_rel_l1": float((cached.latents - base.latents).abs().mean() / base.latents.abs().mean()),
        "stats": stats,
        "base_latents": base.latents,
        "cached_latents": cached.latents,
    }


# ---------------------------------------------------------------------------------------------------------------
# measured runs against the uncached references (the frontier's rows)
# ---------------------------------------------------------------------------------------------------------------
COMPUTE_TARGETS = (0.5, 1.0 / 3.0, 0.25)  # the fractions of full forwards (and of compute) methods are matched at
REACHED = 0.05  # a setting further than this from a target does not count as reaching it
TOLERANCE = 0.01  # stop bisecting when the measured fraction is this close to the target
MAX_PROBES = 6
CURVE_FRACTIONS = (0.8, 0.65, 0.25)


class ComputeMeter:
    """Counts, per transformer call, which Linear layers of the block stack ran and their multiply-accumulates."""

    def __init__(self, transformer: torch.nn.Module, blocks):
        self.transformer = transformer
        self.linears = [m for _, b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
        self.calls: list[float] = []
        self._macs = 0.0
        self._handles = [transformer.register_forward_pre_hook(self._start)]
        self._handles.append(transformer.register_forward_hook(self._end))
        for m in self.linears:
            self._handles.append(m.register_forward_hook(self._count))
        self.reference: float | None = None  # MACs of one uncached call

    def _start(self, module, args):
        self._macs = 0.0

    def _count(self, module, args, output):
        x = args[0] if args else None
        rows = x.numel() // module.in_features if isinstance(x, torch.Tensor) else 0
        self._macs += float(rows) * module.in_features * module.out_features

    def _end(self, module, args, output):
        self.calls.append(self._macs)

    def take(self) -> list[float]:
        calls, self.calls = self.calls, []
        return calls

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def summarize(self, calls: list[float]) -> tuple[float, float]:
        """(fraction of full forwards, compute share) of these calls against :attr:`reference`."""
        ref = self.reference
        if not calls or not ref:
            return float("nan"), float("nan")
        full = sum(1 for c in calls if c >= ref * (1 - 1e-6))
        return full / len(calls), sum(calls) / (ref * len(calls))


@dataclasses.dataclass
class Point:
    method: str
    setting: dict
    fraction: float
    compute: float
    latent_rel_l1: float
    psnr: float
    ssim: float
    latent_rel_l1_std: float = 0.0

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


class Harness:
    """Runs every job with a method installed and measures it against the uncached references."""

    def __init__(self, pipe, jobs, *, steps, guidance, pipeline_kwargs, echo):
        self.pipe = pipe
        self.jobs = jobs
        self.steps = steps
        self.echo = echo
        self.transformer = pipe.transformer
        self.blocks = get_adapter(self.transformer).blocks(self.transformer)
        self.generate = Generator(pipe, steps=steps, guidance=guidance, pipeline_kwargs=pipeline_kwargs)
        self.meter = ComputeMeter(self.transformer, self.blocks)
        # The held-out prompts of one seed run as one batch (one pipeline call): the same work per method, a
        # fraction of the calls. Each row is compared with the same row of the uncached batch.
        self.batches = [(tuple(p for p, s in jobs if s == seed), seed) for seed in dict.fromkeys(s for _, s in jobs)]
        self.references = {}
        for batch in self.batches:
            self.references[batch] = self.generate_batch(batch)
            calls = self.meter.take()
            self.meter.reference = max([self.meter.reference or 0.0, *calls])
            self.calls_per_step = len(calls) / steps  # 2 where CFG runs as two calls

    def generate_batch(self, batch, context=None):
        """One batch ``(prompts, seed)``: its final latents and decoded planes."""
        prompts, seed = batch
        out = self.generate(list(prompts), seed, context=context)
        return out.latents, [to_planes(image) for image in self.generate.images]

    def close(self):
        self.meter.remove()
        self.generate.close()

    def run(self, method: str, install, setting: dict) -> Point:
        undo = install()
        errs, psnrs, ssims, calls = [], [], [], []
        try:
            for batch in self.batches:
                diffusers_cache = getattr(self.transformer, "is_cache_enabled", False)
                if diffusers_cache:
                    self.transformer._reset_stateful_cache()
                ctx = self.transformer.cache_context("inference") if diffusers_cache else contextlib.nullcontext()
                latents, planes = self.generate_batch(batch, context=ctx)
                calls.extend(self.meter.take())
                ref_latents, ref_planes = self.references[batch]
                for row in range(len(batch[0])):
                    errs.append(latent_rel_l1(ref_latents[row], latents[row]))
                    psnrs.append(psnr(ref_planes[row], planes[row]))
                    ssims.append(ssim(ref_planes[row], planes[row]))
        finally:
            undo()
            self.meter.take()
        fraction, compute = self.meter.summarize(calls)
        point = Point(method, setting, fraction, compute, float(np.mean(errs)), float(np.mean(psnrs)),
                      float(np.mean(ssims)), float(np.std(errs)))
        self.echo(f"  {method:<11} {_setting_text(setting):<34} full forwards {fraction:6.1%}  compute {compute:6.1%}  "
                  f"latent rel-L1 {point.latent_rel_l1:.4f}  PSNR {point.psnr:5.1f} dB")
        return point


def _setting_text(setting: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def search(harness: Harness, method: str, make_install, target: float, guess: float, key: str = "fraction",
           probes: dict | None = None) -> list[Point]:
    """Bisection over real runs for the threshold whose measured ``key`` is closest to ``target`` (the
    measured fraction falls as the threshold grows)."""
    probes = {} if probes is None else probes

    def measure(t):
        t = float(f"{t:.6g}")
        if t not in probes:
            probes[t] = harness.run(method, make_install(t), {"threshold": t})
        return getattr(probes[t], key)

    measured_search(measure, target, guess, max_probes=MAX_PROBES, tolerance=TOLERANCE)
    return list(probes.values())


def closest(points: list[Point], target: float, key: str = "fraction") -> Point | None:
    points = [p for p in points if math.isfinite(getattr(p, key))]
    if not points:
        return None
    gap = min(abs(getattr(p, key) - target) for p in points)
    near = [p for p in points if abs(getattr(p, key) - target) <= gap + 1e-9]
    return min(near, key=lambda p: (getattr(p, key), p.latent_rel_l1))
