"""The one generation harness: :class:`Generator` runs a prompt (or a batch of prompts) x seed through a pipeline,
timed, and keeps the final latents and the decoded output. ``calib eval`` (:mod:`calib.evaluation`), ``calib demo``
(:func:`compare_cached`) and the frontier (:mod:`calib.frontier`) all generate through it."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CalibError
from ..hooking import wrap_method
from .metrics import latent_rel_l1, psnr, ssim, to_planes


@dataclass
class Output:
    latents: torch.Tensor  # the final latents (the last scheduler.step's sample)
    planes: np.ndarray | None  # decoded output, (N, H, W) on the 0-255 scale (None for output_type="latent")
    seconds: float


class Generator:
    """Runs one prompt x seed through a pipeline and keeps the final latents (read from ``scheduler.step``, so any
    pipeline works) and the decoded output (``output_type="np"``; ``"latent"`` skips the decoding)."""

    def __init__(self, pipe, *, steps: int, guidance: float, pipeline_kwargs: dict | None = None,
                 output_type: str = "np"):
        self.pipe = pipe
        self.steps = steps
        self.guidance = guidance
        self.kwargs = dict(pipeline_kwargs or {})
        self.output_type = output_type
        self._last = None
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None or not hasattr(scheduler, "step"):
            raise CalibError(f"{type(pipe).__name__} has no scheduler with a step(); calib eval needs a pipeline")

        def keep(result, *args, **kwargs):
            sample = result[0] if isinstance(result, (tuple, list)) else getattr(result, "prev_sample", result)
            self._last = sample

        self._undo = wrap_method(scheduler, "step", after=keep)

    def close(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def __call__(self, prompt, seed: int, context=None) -> Output:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self._last = None
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        with context if context is not None else contextlib.nullcontext():
            # prompt by name: an image-to-video pipeline's first parameter is its image
            out = self.pipe(prompt=prompt, num_inference_steps=self.steps, guidance_scale=self.guidance,
                            generator=generator, output_type=self.output_type, **self.kwargs)
        sync()
        seconds = time.perf_counter() - start
        images = getattr(out, "frames", None)
        if images is None:
            images = out.images if hasattr(out, "images") else out[0]
        if self._last is None:
            raise CalibError(f"{type(self.pipe).__name__} never called scheduler.step; cannot read its final latents")
        self.images = images  # every output of the call (a list of prompts generates a batch)
        planes = None if self.output_type == "latent" else to_planes(images[0])
        return Output(self._last.detach().float().cpu().clone(), planes, seconds)


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
    from ..runtime.coefficients import ComponentRescaler

    comps = {name: ComponentRescaler(tuple(float(c) for c in coefficients), None) for name in config.components}
    return dataclasses.replace(config, components=comps, recommended_threshold=None)


def runtime_install(pipe, config, threshold=None, forecast=None, budget=None):
    """``install() -> undo``: calib's runtime on ``pipe`` (a gate at ``threshold`` or a schedule at ``budget``)."""
    def install():
        import calib.runtime as cr

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
    import calib.runtime as cr

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
