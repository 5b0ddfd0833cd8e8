"""What the built-in reference pipelines share: weight files, argument checks and the classifier-free guidance step.

Both built-in models (:mod:`calib.models.digits`, :mod:`calib.models.wan_digits`) are a diffusers transformer plus a
learned per-class "text encoder", saved together in one safetensors file with the prefixes ``transformer.`` and
``prompt_encoder.``. Their pipelines differ only in how latents are laid out and what the transformer takes; the
guidance step below is written once so that both pass CFG to the transformer the way diffusers' pipelines do.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import CalibError
from .digit_prompts import parse_digit_prompt  # both built-in models take digit prompts

CFG_MODES = ("batched", "sequential")
OUTPUT_TYPES = ("pil", "np", "latent")


def save_weights(path: Path, transformer: nn.Module, prompt_encoder: nn.Module, metadata: dict) -> None:
    """Write both modules into one safetensors file, atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    state = {f"transformer.{k}": v.contiguous() for k, v in transformer.state_dict().items()}
    state.update({f"prompt_encoder.{k}": v.contiguous() for k, v in prompt_encoder.state_dict().items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    tmp.replace(path)


def load_weights(transformer: nn.Module, prompt_encoder: nn.Module, path: Path, trainer: str) -> None:
    """Load a file written by :func:`save_weights`; ``trainer`` is the module that makes it (named in the error)."""
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise CalibError(f"built-in weights not found at {path}; run `python -m {trainer}` to train them")
    state = load_file(str(path))
    for prefix, module in (("transformer.", transformer), ("prompt_encoder.", prompt_encoder)):
        module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def rectified_flow_batch(x_all: torch.Tensor, labels: torch.Tensor, batch: int, null_class: int, null_prob: float,
                         gen: torch.Generator):
    """One training batch of the rectified-flow objective: ``(x0, y, noise, t, xt)`` with ``xt = (1 - t) x0 + t
    noise`` and the label dropped to ``null_class`` with probability ``null_prob`` (classifier-free guidance). The
    draws from ``gen`` come in a fixed order, so the trainers reproduce their shipped weights."""
    idx = torch.randint(0, x_all.shape[0], (batch,), generator=gen)
    x0 = x_all[idx]
    y = labels[idx].clone()
    y[torch.rand(batch, generator=gen) < null_prob] = null_class
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.rand(batch, generator=gen)
    xt = (1 - t).view(-1, *([1] * (x0.dim() - 1))) * x0 + t.view(-1, *([1] * (x0.dim() - 1))) * noise
    return x0, y, noise, t, xt


def optimizer_step(loss: torch.Tensor, opt, sched, params, max_norm: float = 1.0) -> None:
    """One training step of the built-in models' recipe: backward, gradient clipping, AdamW, scheduler."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    sched.step()


class LossLog:
    """The training loss as an exponential moving average, logged and kept every 100 steps (and at step 1)."""

    def __init__(self, log=print):
        self.log = log
        self.running: float | None = None
        self.history: list[tuple[int, float]] = []
        self.start = time.perf_counter()

    def update(self, step: int, loss: torch.Tensor) -> None:
        value = loss.item()
        self.running = value if self.running is None else 0.98 * self.running + 0.02 * value
        if step % 100 == 0 or step == 1:
            self.history.append((step, round(self.running, 4)))
            self.log(f"step {step:5d}  loss {self.running:.4f}  {time.perf_counter() - self.start:6.1f}s")


def _pipeline_base():
    from diffusers import DiffusionPipeline

    return DiffusionPipeline


class BuiltinPipeline(_pipeline_base()):
    """A transformer, a scheduler and a per-class prompt encoder; prompts name a digit."""

    model_cpu_offload_seq = "prompt_encoder->transformer"

    def __init__(self, transformer, scheduler, prompt_encoder):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, prompt_encoder=prompt_encoder)

    def validate_prompts(self, prompts: list[str]) -> None:
        """Raise CalibError for the first prompt this model cannot map to a digit."""
        for prompt in prompts:
            parse_digit_prompt(prompt)

    @staticmethod
    def _prompt_list(prompt, num_inference_steps: int, cfg_mode: str, output_type: str) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise CalibError("no prompt given")
        if num_inference_steps < 2:
            raise CalibError(f"num_inference_steps must be at least 2, got {num_inference_steps}")
        if cfg_mode not in CFG_MODES:
            raise CalibError(f"cfg_mode must be 'batched' or 'sequential', got {cfg_mode!r}")
        if output_type not in OUTPUT_TYPES:
            raise CalibError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        return prompts

    def _context(self, name: str):
        # diffusers' CacheMixin exposes cache_context so that its caches keep per-branch state; mirror what its own
        # pipelines do so calib and diffusers caches see the same labels.
        ctx = getattr(self.transformer, "cache_context", None)
        return contextlib.nullcontext() if ctx is None else ctx(name)

    def _guided(
        self,
        run: Callable[..., torch.Tensor],
        latents: torch.Tensor,
        cond: Sequence[torch.Tensor],
        null: Sequence[torch.Tensor],
        timestep: torch.Tensor,
        guidance_scale: float,
        cfg_mode: str,
    ) -> torch.Tensor:
        """One step's velocity: ``run(latents, *conditioning, timestep)`` once without guidance; with guidance either
        one call on the batch [uncond; cond] (``batched``) or two calls, cond first, under ``cache_context``."""
        if guidance_scale <= 1.0:
            return run(latents, *cond, timestep)
        if cfg_mode == "batched":
            both = run(
                torch.cat([latents, latents]),
                *(torch.cat([n, c]) for n, c in zip(null, cond)),
                torch.cat([timestep, timestep]),
            )
            uncond_v, cond_v = both.chunk(2)
        else:
            with self._context("cond"):
                cond_v = run(latents, *cond, timestep)
            with self._context("uncond"):
                uncond_v = run(latents, *null, timestep)
        return uncond_v + guidance_scale * (cond_v - uncond_v)

    @classmethod
    def from_parts(cls, transformer, prompt_encoder, scheduler, device) -> "BuiltinPipeline":
        transformer.eval()
        prompt_encoder.eval()
        pipe = cls(transformer=transformer, scheduler=scheduler, prompt_encoder=prompt_encoder)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
