"""``builtin:digits-lora``: the built-in digits model with a LoRA that draws bold strokes.

Why it exists: a user with calibrated coefficients for a base model asks whether they still hold once a LoRA is
loaded. This variant is that situation in miniature: the shipped ``builtin:digits`` transformer, unchanged, plus a
rank-4 LoRA adapter (``calib/models/weights/digits_lora.safetensors``, trained by
``python -m calib.models.train_digits_lora`` on a bold copy of the digits), loaded the diffusers way
(``FluxTransformer2DModel.load_lora_adapter``, peft underneath), so the served transformer is "base + LoRA" exactly
as a user's would be. It needs peft (``pip install 'calib[lora]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import CalibError
from . import digits

LORA_WEIGHTS_FILE = digits.WEIGHTS_DIR / "digits_lora.safetensors"
ADAPTER_NAME = "bold"
TRAINER = "calib.models.train_digits_lora"

# The layers diffusers' FLUX LoRA scripts adapt (attention projections and feed-forwards of the double blocks, the
# MLP and output projections of the single blocks); the modulation (AdaLayerNorm) layers keep the base weights.
LORA_CONFIG = {
    "r": 4,
    "lora_alpha": 4,
    "init_lora_weights": "gaussian",
    "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                       "proj_out"],
}

# The style: each stroke spreads 30 % of its ink into its 4-neighbours (a grey dilation), then clips to the range.
BOLD_SPREAD = 0.3
PEFT_HINT = "pip install 'calib[lora]'"


def bold(images: torch.Tensor) -> torch.Tensor:
    """(B, 8, 8) images in [-1, 1] -> their bold version: ``clip(x + 0.3 * dilate(x), 0, 1)`` on the [0, 1] ink."""
    from scipy import ndimage

    ink = (images.numpy().astype(np.float64) + 1.0) / 2.0
    cross = ndimage.generate_binary_structure(2, 1)
    spread = np.stack([ndimage.grey_dilation(img, footprint=cross) for img in ink])
    thick = np.clip(ink + BOLD_SPREAD * spread, 0.0, 1.0)
    return torch.tensor(thick * 2.0 - 1.0, dtype=images.dtype)


def require_peft() -> None:
    """peft applies the LoRA (diffusers' load_lora_adapter needs it): refuse in one line where it is missing."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise CalibError(f"builtin:digits-lora loads a LoRA with peft, which is not installed: {PEFT_HINT}") from None


def lora_config():
    """The peft ``LoraConfig`` the adapter was trained with."""
    require_peft()
    from peft import LoraConfig

    return LoraConfig(**LORA_CONFIG)


def save_adapter(path: Path, transformer, metadata: dict) -> None:
    """Write the adapter's weights only (``transformer.``-prefixed, as diffusers' LoRA files name them), atomically,
    with the LoRA config and ``metadata`` (training settings, loss history) as JSON in the safetensors metadata."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    state = {f"transformer.{k}": v.detach().contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fields = {"lora_config": LORA_CONFIG, **metadata}
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in fields.items()})
    tmp.replace(path)


def load_adapter(transformer, path: Path = LORA_WEIGHTS_FILE) -> None:
    """Load the adapter into ``transformer`` with diffusers' ``load_lora_adapter`` (active, unfused)."""
    require_peft()
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise CalibError(f"built-in LoRA weights not found at {path}; run `python -m {TRAINER}` to train them")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("lora_config", json.dumps(LORA_CONFIG)))
    # diffusers filters the metadata by the same "transformer." prefix as the weights.
    transformer.load_lora_adapter(load_file(str(path)), prefix="transformer", adapter_name=ADAPTER_NAME,
                                  metadata={f"transformer.{k}": v for k, v in config.items()})


def load_pipeline(adapter: Path | None = None, weights: Path | None = None,
                  device: str | torch.device = "cpu") -> digits.DigitsPipeline:
    """``builtin:digits-lora``: the shipped digits pipeline with the bold-stroke LoRA loaded into its transformer."""
    require_peft()  # before loading the base weights
    pipe = digits.load_pipeline(weights=weights, device="cpu")
    load_adapter(pipe.transformer, adapter or LORA_WEIGHTS_FILE)
    pipe.transformer.eval()
    pipe.to(device)
    return pipe
