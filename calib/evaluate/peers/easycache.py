"""EasyCache (arXiv 2507.02860, "Less is Enough: Training-Free Video Diffusion Acceleration via Runtime-Adaptive
Caching"), implemented from the paper and its reference code (H-EmbodVis/EasyCache, read, not copied).

The rule, per denoising step ``t`` (the transformer as a whole maps its input latents ``x_t`` to ``v_t``):

* on a computed step it keeps the transformation ``Delta = v_t - x_t`` and the *transformation rate*
  ``k = mean|v_t - v_s| / mean|x_t - x_s|`` against the previous computed step ``s``;
* on every later step it adds ``k * mean|x_t - x_(t-1)| / mean|v_s|`` (the predicted relative output change) to an
  accumulator; while the accumulator is below the threshold ``tau`` the whole transformer is skipped and returns
  ``x_t + Delta``; at or above it the step is computed and the accumulator reset;
* the first ``R`` steps (the warm-up) and the last step are always computed. With CFG as two calls, the decision is
  made on the first (cond) call of a step and the other call follows it, each with its own ``Delta``.

What the paper recommends: ``tau`` 0.05 (its code: "0.1 for 2.0x speedup, 0.2 for 3.0x"), a warm-up of ``R`` = 10 of
50 steps (20 %), the last step computed. Swept here: ``tau`` bisected over real runs to each target (the whole
transformer is skipped, so the compute share equals the fraction of full forwards and one axis is searched); the
warm-up at the paper's 20 % (6 of 30 steps), 10 % and 1-2 steps (the 25 % target leaves the paper's warm-up one
free computed step).

Hooks: the transformer's own ``forward`` is wrapped (the embeddings, blocks and head all skipped on a reused step);
:meth:`EasyCache.remove` restores it exactly. A model whose output shape differs from its input's (no ``v - x``) is
refused in one line."""

from __future__ import annotations

import dataclasses
import math

import torch

from calib.errors import CalibError
from calib.evaluate.peers.common import (Hooks, peer_row, StepCounter, call_argument, output_tensor, same_output_kind,
                                         threshold_points, timestep_of)

EASYCACHE_THRESHOLD = 0.05  # the paper's default: where the bisection starts
EASYCACHE_WARMUP_SHARE = 0.2  # the paper's 10 of 50 steps


@dataclasses.dataclass(frozen=True)
class EasyCacheConfig:
    """``threshold``: the accumulated predicted relative change below which a step reuses ``Delta``; ``steps``: the
    sampling steps; ``warmup``: steps always computed at the start (default the paper's 20 %); ``end``: steps
    always computed at the end (the paper's 1)."""

    threshold: float
    steps: int
    warmup: int | None = None
    end: int = 1

    def __post_init__(self):
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be a non-negative number, got {self.threshold}")
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.warmup is None:
            object.__setattr__(self, "warmup", max(1, round(EASYCACHE_WARMUP_SHARE * self.steps)))
        if self.warmup < 1 or self.end < 0:
            raise ValueError(f"warmup must be at least 1 and end non-negative, got {self.warmup} and {self.end}")


@dataclasses.dataclass
class _Stream:
    """One CFG stream's history: the last input, the last computed step's input, output and Delta."""

    last_input: torch.Tensor | None = None
    computed_input: torch.Tensor | None = None
    computed_output: torch.Tensor | None = None
    delta: torch.Tensor | None = None


def _mean_abs(x: torch.Tensor) -> float:
    return float(x.abs().float().mean())


class EasyCache:
    """EasyCache on one transformer (see the module docstring). ``stats()``: computed and reused calls."""

    def __init__(self, transformer: torch.nn.Module, config: EasyCacheConfig):
        self.config = config
        self.counter = StepCounter(config.steps)
        self.hooks = Hooks()
        self.computed = self.reused = 0
        self.transformer = transformer
        self._output_of = None
        self._reset()
        self.hooks.wrap_forward(transformer, self._forward)

    def _reset(self) -> None:
        self.streams: dict[int, _Stream] = {}
        self.rate: float | None = None
        self.accumulated = 0.0
        self.compute_step = True

    def _decide(self, step: int, x: torch.Tensor, stream: _Stream) -> bool:
        cfg = self.config
        if step < cfg.warmup or step >= cfg.steps - cfg.end:
            self.accumulated = 0.0
            return True
        if self.rate is None or stream.last_input is None or stream.computed_output is None or stream.delta is None:
            return True
        scale = _mean_abs(stream.computed_output)
        self.accumulated += self.rate * _mean_abs(x - stream.last_input) / max(scale, 1e-12)
        if self.accumulated < cfg.threshold:
            return False
        self.accumulated = 0.0
        return True

    def _forward(self, original, *args, **kwargs):
        step, index, new_generation = self.counter.on_call(timestep_of(self.transformer, args, kwargs))
        if new_generation:
            self._reset()
        x = call_argument(self.transformer, "hidden_states", args, kwargs)
        if x is None:
            x = args[0]
        stream = self.streams.setdefault(index, _Stream())
        if index == 0:
            self.compute_step = self._decide(step, x, stream)
        reuse = not self.compute_step and stream.delta is not None
        stream.last_input = x.detach()
        if reuse:
            self.reused += 1
            return self._template_output(x + stream.delta)
        output = original(*args, **kwargs)
        v = output_tensor(output)
        if v.shape != x.shape:
            raise CalibError(f"{type(self.transformer).__name__}'s output {tuple(v.shape)} is not shaped like its "
                             f"input {tuple(x.shape)}: EasyCache's v - x is undefined")
        self.computed += 1
        if index == 0 and stream.computed_output is not None:
            moved = _mean_abs(x - stream.computed_input)
            if moved > 0:
                self.rate = _mean_abs(v - stream.computed_output) / moved
        stream.computed_input, stream.computed_output = x.detach(), v.detach()
        stream.delta = (v - x).detach()
        self._output_of = output
        return output

    def _template_output(self, tensor: torch.Tensor):
        return same_output_kind(self._output_of, tensor)

    def stats(self) -> dict:
        return {"computed": self.computed, "reused": self.reused}

    def remove(self) -> None:
        self.hooks.remove()


def easycache_install(transformer, steps: int, threshold: float, warmup: int | None = None):
    """``install() -> undo``: EasyCache at ``threshold`` on ``transformer``."""
    def install():
        return EasyCache(transformer, EasyCacheConfig(threshold=threshold, steps=steps, warmup=warmup)).remove

    return install


def easycache_warmups(n: int) -> tuple[int, ...]:
    """The paper's warm-up (20 % of the steps), half of it, and 2 steps."""
    return tuple(dict.fromkeys((max(1, round(EASYCACHE_WARMUP_SHARE * n)), max(1, round(0.1 * n)), 2)))


def easycache_points(inputs) -> list:
    harness = inputs.harness
    n = harness.steps
    points = []
    for warmup in easycache_warmups(n):
        def make(t, w=warmup):
            return easycache_install(harness.transformer, n, t, warmup=w)

        points += threshold_points(harness, "easycache", make, {"warmup": warmup}, inputs.targets,
                                   guess=EASYCACHE_THRESHOLD, max_probes=5)
    return points


ROWS = {"easycache": peer_row("EasyCache (Delta = v - x reused, rate test; paper's rule)", easycache_points)}
