"""What every peer row shares: the row record, installing a diffusers cache config, the bisection of a threshold over
real runs (with the setting it belongs to), the check that a model is restored, and the small hook kit the peers
implemented here (Spectrum, EasyCache, SeaCache's step metadata) use on the transformer itself.

The hook kit is self-contained on purpose: a peer is measured as its paper describes it, not through calib's runtime,
and every hook it installs is undone exactly (the frontier checks: :func:`unrestored`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import torch

from calib.errors import CalibError
from calib.evaluate.harness import MAX_PROBES, REACHED, TOLERANCE, Point
from calib.methods.base import FrontierRow
from calib.methods.search import measured_search

LARGE_THRESHOLD = 1e3  # a threshold no relative change reaches: the setting skips as much as its other limits allow


def peer_row(label: str, run: Callable[[Any], list[Point]], *, partial: bool = False) -> FrontierRow:
    """A peer's row of the frontier (:class:`calib.methods.base.FrontierRow`, never calibrated by calib): its
    label, how its points are made (``run(frontier_run) -> [Point]``) and whether it never skips a whole forward
    (then it is matched on the compute share)."""
    return FrontierRow(label, run, partial=partial, calibrated=False)


def diffusers_install(transformer, make_config):
    """``install() -> undo`` for a diffusers cache config (``transformer.enable_cache``)."""
    def install():
        transformer.enable_cache(make_config())
        return transformer.disable_cache

    return install


def threshold_points(harness, name: str, make_install: Callable[[float], Callable], setting: dict, targets, *,
                     axes=("fraction",), guess: float = 0.1, max_probes: int = MAX_PROBES) -> list[Point]:
    """One setting's threshold bisected over real runs to each target on each axis (``fraction``: of full forwards,
    ``compute``: the block stack's MAC share); the measured fraction falls as the threshold grows. The setting is
    first run at :data:`LARGE_THRESHOLD` (as far as it can skip): a target at or below what it computes there is not
    searched (that probe is its nearest). Every probe is a point whose setting is ``setting`` plus its threshold."""
    probes: dict[float, Point] = {}

    def run(t: float) -> Point:
        t = float(f"{t:.6g}")
        if t not in probes:
            probes[t] = harness.run(name, make_install(t), {**setting, "threshold": t})
        return probes[t]

    floor = run(LARGE_THRESHOLD)
    for key in axes:
        for target in targets:
            if getattr(floor, key) >= target:
                continue  # it never computes less than there: that probe is its nearest to the target
            measured_search(lambda t, k=key: getattr(run(t), k), target, guess, max_probes=max_probes,
                            tolerance=TOLERANCE)
    return list(probes.values())


def nearest_settings(fraction_of: Callable[[Any], float], settings, targets, *, limit: int | None = None) -> list:
    """The settings (of a static schedule) whose fraction of computed steps is the one nearest each target that any
    reaches (within :data:`REACHED`); ``limit`` of them per target at most, in the given order."""
    table = [(s, fraction_of(s)) for s in settings]
    chosen = []
    for target in targets:
        nearest = min(abs(f - target) for _, f in table)
        if nearest > REACHED:
            continue
        fits = [s for s, f in table if abs(abs(f - target) - nearest) < 1e-9]
        chosen += [s for s in fits[:limit] if s not in chosen]
    return chosen


def unrestored(harness) -> str | None:
    """None when an uncached generation reproduces the reference exactly again (every hook is gone), else why not."""
    prompts, seed = batch = harness.batches[0]
    try:
        latents = harness.generate(list(prompts), seed).latents
    except Exception as exc:  # noqa: BLE001
        return f"the model fails after it was removed ({type(exc).__name__})"
    finally:
        harness.meter.take()
    if torch.equal(latents, harness.references[batch][0]):
        return None
    return "the model's output changed after it was removed"


def checked(name: str, points_of: Callable[[Any], list[Point]]) -> Callable[[Any], list[Point]]:
    """A row's ``run`` that warns (through ``echo``) when the model is not exactly restored after the row."""
    def run(inputs) -> list[Point]:
        points = points_of(inputs)
        broken = unrestored(inputs.harness)
        if broken is not None:
            inputs.echo(f"  {name}: warning — {broken}; the rows after it are not trustworthy")
        return points

    return run


# ---------------------------------------------------------------------------------------------------------------
# the hook kit of the peers implemented here
# ---------------------------------------------------------------------------------------------------------------
def call_argument(module: torch.nn.Module, name: str, args: tuple, kwargs: dict):
    """The value of ``module``'s forward parameter ``name`` in one call, by keyword or by position (None if absent).
    The class's own ``forward`` names the parameters: hooks may have wrapped the instance's."""
    if name in kwargs:
        return kwargs[name]
    params = _forward_parameters(type(module))
    if name in params and params.index(name) < len(args):
        return args[params.index(name)]
    return None


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls) -> list[str]:
    return list(inspect.signature(cls.forward).parameters)[1:]  # without self


class StepCounter:
    """Which denoising step, and which call within it (the CFG stream), a transformer call is.

    A call whose timestep differs from the previous call's starts a step; a generation ends after ``steps`` steps,
    or earlier when the timestep rises (a new sampling loop). Pipelines that batch CFG make one call per step
    (stream 0); those that call cond and uncond separately make two (streams 0 and 1)."""

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        self.steps = steps
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self.stream = 0
        self._last: float | None = None

    def on_call(self, timestep) -> tuple[int, int, bool]:
        """``(step, stream, new_generation)`` of this call."""
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        new_generation = False
        if self._last is None or t != self._last:
            if self._last is None or self.step + 1 >= self.steps or t > self._last:
                self.step, new_generation = -1, True
            self.step += 1
            self.stream = 0
        else:
            self.stream += 1
        self._last = t
        return self.step, self.stream, new_generation


class Hooks:
    """Hooks on one transformer, each undone exactly by :meth:`remove` (in reverse order; idempotent)."""

    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def torch_hook(self, handle) -> None:
        self._undo.append(handle.remove)

    def wrap_forward(self, module: torch.nn.Module, wrapper: Callable[..., Any]) -> None:
        """``module(...)`` calls ``wrapper(original_forward, *args, **kwargs)`` until removed."""
        had_own = "forward" in module.__dict__
        own = module.__dict__.get("forward")
        original = module.forward

        @functools.wraps(original)  # its signature stays the original's (callers read parameters by name)
        def forward(*args, **kwargs):
            return wrapper(original, *args, **kwargs)

        module.forward = forward

        def undo():
            if had_own:
                module.forward = own
            else:
                module.__dict__.pop("forward", None)

        self._undo.append(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def timestep_of(transformer: torch.nn.Module, args: tuple, kwargs: dict):
    t = call_argument(transformer, "timestep", args, kwargs)
    if t is None:
        raise CalibError(f"{type(transformer).__name__} is called without a timestep argument: the step is unknown")
    return t


def output_tensor(output) -> torch.Tensor:
    """The denoiser prediction in a transformer's return value (tuple or ``Transformer2DModelOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


def same_output_kind(output, tensor: torch.Tensor):
    """``tensor`` returned the way ``output`` was (tuple, ``...Output(sample=)`` or a bare tensor)."""
    if isinstance(output, torch.Tensor):
        return tensor
    if hasattr(output, "sample"):
        return dataclasses.replace(output, sample=tensor) if dataclasses.is_dataclass(output) else type(output)(
            sample=tensor)
    return (tensor, *tuple(output)[1:])

