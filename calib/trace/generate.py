"""Running a pipeline for one prompt (or a batch of prompts) x seed and keeping what it made: the final latents
(read from ``scheduler.step``, so any pipeline works), the decoded output and the time it took. Every generation
calib measures goes through :class:`Generator`: calib eval, the demo and the frontier (calib.evaluate.harness) and
the schedule fit's segment runs (calib.methods.schedule).

The time of a generation that runs once is read by :func:`timed`, the one clock of calib's measured runs (also
benchmarks/): it finishes the device's queued work before starting and before stopping the clock. (Repeated runs of
one statement are what ``torch.utils.benchmark.Timer`` is for; a generation here runs once per prompt x seed, with
its output kept, so it is timed once.) It lives here rather than in calib.evaluate because the generator and the
schedule search (calib.methods) below evaluate time generations with it."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from calib.errors import CalibError
from calib.hooking import wrap_method


def to_planes(image) -> np.ndarray:
    """A pipeline's decoded output (PIL image, uint8 array, float array in [0, 1], a list of frames) as float64
    planes ``(N, H, W)`` on the 0-255 scale: channels-last images are split into their channels."""
    if isinstance(image, (list, tuple)):
        return np.concatenate([to_planes(frame) for frame in image], axis=0)
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float64)
    else:
        arr = np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim >= 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[-3] > 4:  # (..., H, W, C)
        arr = np.moveaxis(arr, -1, -3)
    return arr.reshape(-1, arr.shape[-2], arr.shape[-1])


def synchronize(device=None) -> None:
    """Wait until the work queued on ``device`` is done: CUDA (and the other accelerators) run asynchronously, so a
    clock read without this stops when the work is queued, not when it is done. A no-op on the CPU. ``None``: the
    current accelerator's device, if there is one."""
    if device is None:
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is None or not accelerator.is_available():
            return
        device = accelerator.current_accelerator()
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return
    sync = getattr(getattr(torch, device.type, None), "synchronize", None)
    if sync is None:
        return
    try:
        sync(device)
    except TypeError:  # torch.mps.synchronize() takes no device
        sync()


@dataclass
class Took:
    seconds: float = float("nan")  # set when the timed block ends


@contextlib.contextmanager
def timed(device=None):
    """``with timed(device) as took: ...`` -> ``took.seconds``: the wall-clock time of the block, with ``device``'s
    queued work finished before the clock starts and before it stops (:func:`synchronize`)."""
    took = Took()
    synchronize(device)
    start = time.perf_counter()
    yield took
    synchronize(device)
    took.seconds = time.perf_counter() - start


def pipeline_device(pipe):
    """The device a pipeline computes on: diffusers' execution device (the GPU also under CPU offload, where the
    modules' own device says cpu), else its ``device``; None if it has neither."""
    for name in ("_execution_device", "device"):
        try:
            device = getattr(pipe, name, None)
        except Exception:  # noqa: BLE001 - a pipeline whose property fails to answer has no device to report
            device = None
        if device is not None:
            return device
    return None


@dataclass
class Output:
    latents: torch.Tensor  # the final latents (the last scheduler.step's sample)
    planes: np.ndarray | None  # decoded output, (N, H, W) on the 0-255 scale (None for output_type="latent")
    seconds: float


class Generator:
    """Runs one prompt x seed through a pipeline and keeps the final latents (read from ``scheduler.step``, so any
    pipeline works) and the decoded output (``output_type="np"``; ``"latent"`` skips the decoding)."""

    def __init__(self, pipe, *, steps: int, guidance: float, pipeline_kwargs: dict | None = None,
                 output_type: str = "np", purpose: str = "calib eval"):
        self.pipe = pipe
        self.steps = steps
        self.guidance = guidance
        self.kwargs = dict(pipeline_kwargs or {})
        self.output_type = output_type
        self._last = None
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None or not hasattr(scheduler, "step"):
            raise CalibError(f"{type(pipe).__name__} has no scheduler with a step(); {purpose} needs a pipeline")

        def keep(result, *args, **kwargs):
            sample = result[0] if isinstance(result, (tuple, list)) else getattr(result, "prev_sample", result)
            self._last = sample

        self._undo = wrap_method(scheduler, "step", after=keep)

    def latest(self) -> torch.Tensor | None:
        """The final latents of the last pipeline call made while this generator is installed, whoever made it
        (calib check reads a traced generation's through it, instead of generating it again)."""
        return None if self._last is None else self._last.detach().float().cpu().clone()

    def close(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def __call__(self, prompt, seed: int, context=None) -> Output:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self._last = None
        with timed(pipeline_device(self.pipe)) as took:
            with context if context is not None else contextlib.nullcontext():
                # prompt by name: an image-to-video pipeline's first parameter is its image
                out = self.pipe(prompt=prompt, num_inference_steps=self.steps, guidance_scale=self.guidance,
                                generator=generator, output_type=self.output_type, **self.kwargs)
        seconds = took.seconds
        images = getattr(out, "frames", None)
        if images is None:
            images = out.images if hasattr(out, "images") else out[0]
        if self._last is None:
            raise CalibError(f"{type(self.pipe).__name__} never called scheduler.step; cannot read its final latents")
        self.images = images  # every output of the call (a list of prompts generates a batch)
        planes = None if self.output_type == "latent" else to_planes(images[0])
        return Output(self._last.detach().float().cpu().clone(), planes, seconds)
