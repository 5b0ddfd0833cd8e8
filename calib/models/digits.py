"""The built-in image reference model: a small FLUX transformer trained on scikit-learn's bundled digits.

Why it exists: hub weights cannot be downloaded on every machine that runs calib, and calibrating an untrained model
measures nothing. This model is a real ``diffusers.FluxTransformer2DModel`` (2 double + 4 single blocks, ~0.6 M
parameters) trained with the rectified-flow objective on the 8x8 images of ``sklearn.datasets.load_digits``
(no download), class-conditioned with an extra null class so classifier-free guidance works.

An 8x8 image is packed FLUX-style into 16 tokens of 4 channels (2x2 patches); the "text encoder" is a learned
embedding per class (:class:`DigitPromptEncoder`), and prompts are mapped to a class by :func:`parse_digit_prompt`.
``python -m calib.models.train_digits`` reproduces the shipped weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import builtin_pipeline
from .digit_prompts import NULL_CLASS, NUM_CLASSES, parse_digit_prompt  # noqa: F401  (re-exported)

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "digits_flux.safetensors"

IMAGE_SIZE = 8
PATCH = 2
TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16
CHANNELS = PATCH * PATCH  # 4
TEXT_TOKENS = 4
JOINT_DIM = 32

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=CHANNELS,
    out_channels=CHANNELS,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=JOINT_DIM,
    pooled_projection_dim=JOINT_DIM,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)

class DigitPromptEncoder(nn.Module):
    """Stands in for a text encoder: one learned token sequence and pooled vector per class (10 digits + null)."""

    def __init__(self, num_classes: int = NUM_CLASSES + 1, tokens: int = TEXT_TOKENS, dim: int = JOINT_DIM):
        super().__init__()
        self.tokens = tokens
        self.dim = dim
        self.sequence = nn.Embedding(num_classes, tokens * dim)
        self.pooled = nn.Embedding(num_classes, dim)
        nn.init.normal_(self.sequence.weight, std=0.5)
        nn.init.normal_(self.pooled.weight, std=0.5)

    # DiffusionPipeline.to() and offloading read these from every component.
    @property
    def dtype(self) -> torch.dtype:
        return self.pooled.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.pooled.weight.device

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.sequence(labels).view(labels.shape[0], self.tokens, self.dim)
        return seq, self.pooled(labels)


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 8, 8) -> (B, 16, 4): 2x2 patches in raster order, as FLUX packs latents."""
    b = images.shape[0]
    x = images.view(b, IMAGE_SIZE // PATCH, PATCH, IMAGE_SIZE // PATCH, PATCH)
    return x.permute(0, 1, 3, 2, 4).reshape(b, TOKENS, CHANNELS)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    b = tokens.shape[0]
    side = IMAGE_SIZE // PATCH
    x = tokens.view(b, side, side, PATCH, PATCH)
    return x.permute(0, 1, 3, 2, 4).reshape(b, IMAGE_SIZE, IMAGE_SIZE)


def position_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's rotary ids: (row, col) per image token, zeros for the text tokens."""
    side = IMAGE_SIZE // PATCH
    img = torch.zeros(side, side, 3)
    img[..., 1] = torch.arange(side)[:, None]
    img[..., 2] = torch.arange(side)[None, :]
    return torch.zeros(TEXT_TOKENS, 3), img.view(TOKENS, 3)


def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 bundled 8x8 digits scaled to [-1, 1], with their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 8.0 - 1.0
    return images, torch.tensor(data.target, dtype=torch.long)


def build_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # shift=1: the model was trained with uniformly drawn sigmas, so no resolution-dependent shifting.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def load_weights(transformer: nn.Module, prompt_encoder: nn.Module, path: Path = WEIGHTS_FILE) -> None:
    builtin_pipeline.load_weights(transformer, prompt_encoder, path, trainer="calib.models.train_digits")


@dataclass
class DigitsOutput:
    """What :class:`DigitsPipeline` returns: PIL images (or arrays, or packed latents) in prompt order."""

    images: list


class DigitsPipeline(builtin_pipeline.BuiltinPipeline):
    """Text-to-image pipeline for the built-in digits model.

    ``pipe("a handwritten 7", num_inference_steps=30, guidance_scale=3.0, generator=g).images[0]`` is an 8x8 PIL image.
    Classifier-free guidance batches [uncond; cond] through the transformer in one call (``cfg_mode="batched"``,
    as most diffusers pipelines do) or calls it twice per step, cond first (``cfg_mode="sequential"``).
    """

    @property
    def resolution(self) -> tuple[int, int]:
        return (IMAGE_SIZE, IMAGE_SIZE)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 30,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        cfg_mode: str = "batched",
        latents: torch.Tensor | None = None,
    ) -> DigitsOutput:
        prompts = self._prompt_list(prompt, num_inference_steps, cfg_mode, output_type)
        self._guidance_scale = guidance_scale  # as diffusers' pipelines keep it (calib.runtime reads it)
        labels = torch.tensor([parse_digit_prompt(p) for p in prompts], dtype=torch.long)
        labels = labels.repeat_interleave(num_images_per_prompt)
        batch = labels.shape[0]
        device = self.transformer.device
        dtype = self.transformer.dtype

        cond_seq, cond_pooled = self.prompt_encoder(labels.to(device))
        null_seq, null_pooled = self.prompt_encoder(torch.full_like(labels, NULL_CLASS).to(device))
        txt_ids, img_ids = position_ids()
        txt_ids, img_ids = txt_ids.to(device, dtype), img_ids.to(device, dtype)

        if latents is None:
            latents = torch.randn((batch, TOKENS, CHANNELS), generator=generator, dtype=torch.float32)
        latents = latents.to(device, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            sigma = (t / 1000.0).expand(batch).to(dtype)

            def run(x, seq, pooled, s):
                return self.transformer(
                    hidden_states=x,
                    encoder_hidden_states=seq.to(dtype),
                    pooled_projections=pooled.to(dtype),
                    timestep=s,
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                    return_dict=False,
                )[0]

            velocity = self._guided(run, latents, (cond_seq, cond_pooled), (null_seq, null_pooled), sigma,
                                    guidance_scale, cfg_mode)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

        if output_type == "latent":
            return DigitsOutput(images=list(latents))
        images = ((unpack(latents.float()).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        if output_type == "np":
            return DigitsOutput(images=list(images))
        from PIL import Image

        return DigitsOutput(images=[Image.fromarray(img, mode="L") for img in images])


def load_pipeline(weights: Path | None = None, device: str | torch.device = "cpu") -> DigitsPipeline:
    """The built-in ``builtin:digits`` pipeline with its shipped, trained weights."""
    transformer, encoder = build_transformer(), DigitPromptEncoder()
    load_weights(transformer, encoder, weights or WEIGHTS_FILE)
    return DigitsPipeline.from_parts(transformer, encoder, build_scheduler(), device)


def latents_to_images(latents: torch.Tensor) -> list[np.ndarray]:
    """Packed latents (B, 16, 4) -> 8x8 uint8 images, as the pipeline decodes them."""
    return list(((unpack(latents.float()).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())


def image_grid(images: list, scale: int = 8) -> "np.ndarray":
    """Tile 8x8 uint8 images side by side, scaled up for viewing."""
    arrays = [np.asarray(img, dtype=np.uint8) for img in images]
    row = np.concatenate([np.pad(a, 1, constant_values=0) for a in arrays], axis=1)
    return np.kron(row, np.ones((scale, scale), dtype=np.uint8))
