"""One generation of a pipeline, as the tests compare them: the outputs of a seeded call, kept as latents.

Built on :class:`calib.trace.generate.Generator` (what ``calib eval`` and the frontier generate with), so the tests
drive a pipeline the way calib does: the prompts by name, a CPU generator seeded per call, ``guidance_scale`` and
``num_inference_steps`` always passed."""

from __future__ import annotations

import torch

from calib.trace.generate import Generator

PROMPTS = ("a handwritten 3", "7")


def generate(pipe, mode: str | None = "batched", seed: int = 0, prompts=PROMPTS, *, steps: int,
             guidance: float = 3.0, **pipeline_kwargs) -> torch.Tensor:
    """The final latents of ``pipe(prompts)`` with ``cfg_mode=mode`` (``None``: the pipeline's default), stacked over
    the prompts: one tensor of ``len(prompts)`` outputs (a video pipeline's frames, an image pipeline's images)."""
    if mode is not None:
        pipeline_kwargs["cfg_mode"] = mode
    run = Generator(pipe, steps=steps, guidance=guidance, pipeline_kwargs=pipeline_kwargs, output_type="latent",
                    purpose="a test")
    try:
        run(list(prompts), seed)
    finally:
        run.close()
    return torch.stack(list(run.images))
