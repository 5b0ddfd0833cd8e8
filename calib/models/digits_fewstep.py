"""``builtin:digits-4step`` and ``builtin:digits-8step``: few-step students of the built-in digits model.

Why they exist: users ask whether coefficients hold for a distilled few-step model, and how a cache behaves when every
step matters. Each student is the same ``FluxTransformer2DModel`` as ``builtin:digits``, initialised from it and
distilled onto its own step grid (the sigmas the pipeline visits at 4 or at 8 steps): on trajectories the base model
(the teacher) draws with classifier-free guidance in ~30 Euler steps, one student step from a grid point must land
where the teacher lands at the next grid point. The target already holds the guidance, so the students run without
CFG, as FLUX.1-schnell does. Two students, not one served at both counts: the 4-step grid (1, 0.667, 0.334, 0.001)
and the 8-step grid (1, 0.857, ..., 0.001) share only their ends, and the velocity a step from sigma 1 needs differs
between them, so one network cannot be exact on both. ``python -m calib.models.train_digits_fewstep`` reproduces
both weight files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CalibError
from . import builtin_pipeline, digits

TRAINER = "calib.models.train_digits_fewstep"
STEP_COUNTS = (4, 8)  # builtin:digits-4step, builtin:digits-8step


def weights_file(steps: int) -> Path:
    return digits.WEIGHTS_DIR / f"digits_{steps}step.safetensors"


class FewStepDigitsPipeline(digits.DigitsPipeline):
    """:class:`~calib.models.digits.DigitsPipeline` for a guidance-distilled student: ``num_inference_steps``
    defaults to the student's step count (4 or 8) and ``guidance_scale`` to 1 (no CFG; the student learnt the
    teacher's guided steps). A scale above 1 still runs CFG against the student's null class, which over-guides;
    another step count runs, off the grid the student was distilled on."""

    default_steps = 4

    # The full signature, not **kwargs: calib checks the arguments it passes against it before loading.
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        cfg_mode: str = "batched",
        latents: torch.Tensor | None = None,
    ) -> digits.DigitsOutput:
        steps = self.default_steps if num_inference_steps is None else num_inference_steps
        return super().__call__(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                                num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                                cfg_mode=cfg_mode, latents=latents)


def load_pipeline(steps: int = 4, weights: Path | None = None,
                  device: str | torch.device = "cpu") -> FewStepDigitsPipeline:
    """The ``steps``-step student, served as ``builtin:digits-{steps}step``."""
    if steps not in STEP_COUNTS:
        raise CalibError(f"no {steps}-step student of builtin:digits; there are {', '.join(map(str, STEP_COUNTS))}")
    transformer, encoder = digits.build_transformer(), digits.DigitPromptEncoder()
    builtin_pipeline.load_weights(transformer, encoder, weights or weights_file(steps), trainer=TRAINER)
    pipe = FewStepDigitsPipeline.from_parts(transformer, encoder, digits.build_scheduler(), device)
    pipe.default_steps = steps
    return pipe
