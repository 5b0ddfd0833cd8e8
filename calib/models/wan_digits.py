"""The built-in video reference model: a small Wan transformer trained on moving scikit-learn digits.

A real ``diffusers.WanTransformer3DModel`` (4 blocks, 4 heads x 16, ffn 128, ~0.24 M parameters) trained with the
rectified-flow objective on 4-frame clips of 12x12 pixels in which one of the bundled 8x8 digits drifts one pixel per
frame in a random direction (one of 8) from a random start, so that every frame stays inside the canvas. It is
class-conditioned with an extra null class so classifier-free guidance works; the "text encoder" is a learned token
sequence per class (:class:`WanDigitPromptEncoder`) and prompts map to a class with
:func:`calib.models.digits.parse_digit_prompt`. Latents are the pixels themselves: (B, 1, 4, 12, 12), the
(B, C, F, H, W) layout Wan takes; patch_size (1, 2, 2) makes 4 x 6 x 6 = 144 tokens.

``python -m calib.models.train_wan_digits`` reproduces the shipped weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CalibError
from . import builtin_pipeline
from .digits import (  # noqa: F401 - load_digits_dataset: the training script takes it from here
    IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, build_scheduler, load_digits_dataset, parse_digit_prompt,
)

WEIGHTS_FILE = Path(__file__).parent / "weights" / "wan_digits.safetensors"

FRAMES = 4
CANVAS = 12
CHANNELS = 1
TEXT_TOKENS = 4
TEXT_DIM = 32
MAX_OFFSET = CANVAS - IMAGE_SIZE  # 4: the digit's top-left corner stays in [0, 4] on both axes

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=CHANNELS,
    out_channels=CHANNELS,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=128,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)

PATCH = TRANSFORMER_CONFIG["patch_size"]
# the rotary table covers rope_max_seq_len positions per axis: frames, and canvas pixels / patch
MAX_FRAMES = TRANSFORMER_CONFIG["rope_max_seq_len"] * PATCH[0]
MAX_CANVAS = TRANSFORMER_CONFIG["rope_max_seq_len"] * PATCH[1]

# The 8 drift directions (dy, dx), one pixel per frame.
DIRECTIONS = torch.tensor([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)])


class WanDigitPromptEncoder(nn.Module):
    """Stands in for Wan's T5: one learned (TEXT_TOKENS, TEXT_DIM) token sequence per class (10 digits + null)."""

    def __init__(self, num_classes: int = NUM_CLASSES + 1, tokens: int = TEXT_TOKENS, dim: int = TEXT_DIM):
        super().__init__()
        self.tokens = tokens
        self.dim = dim
        self.sequence = nn.Embedding(num_classes, tokens * dim)
        nn.init.normal_(self.sequence.weight, std=0.5)

    # DiffusionPipeline.to() and offloading read these from every component.
    @property
    def dtype(self) -> torch.dtype:
        return self.sequence.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.sequence.weight.device

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) class indices -> encoder_hidden_states (B, TEXT_TOKENS, TEXT_DIM)."""
        return self.sequence(labels).view(labels.shape[0], self.tokens, self.dim)


def make_clips(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 8, 8) digits in [-1, 1] -> (B, 1, FRAMES, CANVAS, CANVAS) clips: each digit drifts one pixel per frame in
    a random one of 8 directions from a random start such that all frames stay on the canvas (background -1)."""
    b = images.shape[0]
    direction = DIRECTIONS[torch.randint(0, len(DIRECTIONS), (b,), generator=generator)]  # (B, 2)
    span = (FRAMES - 1) * direction.abs()  # pixels travelled per axis
    start = (torch.rand(b, 2, generator=generator) * (MAX_OFFSET - span + 1)).long()
    start = torch.where(direction < 0, start + span, start)  # moving up/left starts low/right enough
    clips = torch.full((b, 1, FRAMES, CANVAS, CANVAS), -1.0, dtype=images.dtype)
    for f in range(FRAMES):
        pos = start + f * direction
        for i in range(b):
            y, x = int(pos[i, 0]), int(pos[i, 1])
            clips[i, 0, f, y : y + IMAGE_SIZE, x : x + IMAGE_SIZE] = images[i]
    return clips


def build_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**TRANSFORMER_CONFIG)


def load_weights(transformer: nn.Module, prompt_encoder: nn.Module, path: Path = WEIGHTS_FILE) -> None:
    builtin_pipeline.load_weights(transformer, prompt_encoder, path, trainer="calib.models.train_wan_digits")


def latents_to_frames(latents: torch.Tensor) -> np.ndarray:
    """(B, 1, F, H, W) latents in [-1, 1] -> (B, F, H, W) uint8 frames."""
    return ((latents[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


@dataclass
class WanDigitsOutput:
    """What :class:`WanDigitsPipeline` returns, in prompt order: per video a list of PIL frames (``output_type="pil"``),
    a (F, H, W) uint8 array (``"np"``) or the (1, F, H, W) latent (``"latent"``). ``images`` is the same list, so code
    written for the image pipeline works unchanged."""

    frames: list

    @property
    def images(self) -> list:
        return self.frames


class WanDigitsPipeline(builtin_pipeline.BuiltinPipeline):
    """Text-to-video pipeline for the built-in Wan digits model.

    ``pipe("a handwritten 7", num_inference_steps=30, guidance_scale=3.0, generator=g).frames[0]`` is a list of 4
    12x12 PIL frames. Classifier-free guidance batches [uncond; cond] through the transformer in one call
    (``cfg_mode="batched"``) or calls it twice per step, cond first, under ``transformer.cache_context("cond")`` /
    ``("uncond")`` (``cfg_mode="sequential"``), as diffusers' WanPipeline does.
    """

    @property
    def resolution(self) -> tuple[int, int, int]:
        return (FRAMES, CANVAS, CANVAS)

    @staticmethod
    def latent_size(num_frames: int | None, height: int | None, width: int | None) -> tuple[int, int, int]:
        """``(frames, height, width)`` of a call (None: the trained 4 frames of 12x12). Other frame counts and canvas
        sizes run -- the transformer is convolution-free over tokens, with rotary positions -- so a calibration can
        be checked on them (``calib check``); what the model makes there is out of its training distribution. Sizes
        must be whole patches and inside the rotary table (:data:`MAX_FRAMES` frames, :data:`MAX_CANVAS` pixels)."""
        frames = FRAMES if num_frames is None else num_frames
        height = CANVAS if height is None else height
        width = CANVAS if width is None else width
        limits = (("num_frames", frames, PATCH[0], MAX_FRAMES), ("height", height, PATCH[1], MAX_CANVAS),
                  ("width", width, PATCH[2], MAX_CANVAS))
        for name, value, step, high in limits:
            if isinstance(value, bool) or not isinstance(value, int) or not step <= value <= high or value % step:
                raise CalibError(f"the built-in wan-digits model takes {name} a multiple of {step} from {step} to "
                                 f"{high} (trained on {FRAMES} frames of {CANVAS}x{CANVAS}); got {value!r}")
        return frames, height, width

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 30,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        num_videos_per_prompt: int = 1,
        output_type: str = "pil",
        cfg_mode: str = "batched",
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
    ) -> WanDigitsOutput:
        prompts = self._prompt_list(prompt, num_inference_steps, cfg_mode, output_type)
        self._guidance_scale = guidance_scale  # as diffusers' pipelines keep it (calib.runtime reads it)
        frames, height, width = self.latent_size(num_frames, height, width)
        labels = torch.tensor([parse_digit_prompt(p) for p in prompts], dtype=torch.long)
        labels = labels.repeat_interleave(num_videos_per_prompt)
        batch = labels.shape[0]
        device = self.transformer.device
        dtype = self.transformer.dtype

        cond = self.prompt_encoder(labels.to(device)).to(dtype)
        null = self.prompt_encoder(torch.full_like(labels, NULL_CLASS).to(device)).to(dtype)

        if latents is None:
            latents = torch.randn((batch, CHANNELS, frames, height, width), generator=generator, dtype=torch.float32)
        latents = latents.to(device, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            timestep = t.expand(batch).to(dtype)  # Wan embeds the scheduler's 0..1000 timestep directly

            def run(x, seq, ts):
                return self.transformer(hidden_states=x, timestep=ts, encoder_hidden_states=seq, return_dict=False)[0]

            velocity = self._guided(run, latents, (cond,), (null,), timestep, guidance_scale, cfg_mode)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

        if output_type == "latent":
            return WanDigitsOutput(frames=list(latents))
        videos = latents_to_frames(latents)
        if output_type == "np":
            return WanDigitsOutput(frames=list(videos))
        from PIL import Image

        return WanDigitsOutput(frames=[[Image.fromarray(frame, mode="L") for frame in video] for video in videos])


def load_pipeline(weights: Path | None = None, device: str | torch.device = "cpu") -> WanDigitsPipeline:
    """The built-in ``builtin:wan-digits`` pipeline with its shipped, trained weights."""
    transformer, encoder = build_transformer(), WanDigitPromptEncoder()
    load_weights(transformer, encoder, weights or WEIGHTS_FILE)
    return WanDigitsPipeline.from_parts(transformer, encoder, build_scheduler(), device)


def video_grid(videos: list, scale: int = 6) -> np.ndarray:
    """One row per video, its frames side by side (1-pixel gray border), scaled up for viewing."""
    rows = []
    for video in videos:
        frames = [np.asarray(f, dtype=np.uint8) for f in video]
        rows.append(np.concatenate([np.pad(f, 1, constant_values=96) for f in frames], axis=1))
    grid = np.concatenate(rows, axis=0)
    return np.kron(grid, np.ones((scale, scale), dtype=np.uint8))
