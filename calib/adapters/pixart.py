"""PixArt-α / Σ (PixArtTransformer2DModel): BasicTransformerBlock with norm_type "ada_norm_single"."""

from .base import Adapter, ada_norm_single_input

PIXART = Adapter(
    name="pixart",
    model_classes=("PixArtTransformer2DModel",),
    modulation_module=None,
    modulated_input=ada_norm_single_input,
    modulated_input_consumer="attn1",
    block_stacks=("transformer_blocks",),
    temb_argument="timestep",
    notes="first block's norm1(x) * (1 + scale_msa) + shift_msa from scale_shift_table + timestep (the AdaLN-single "
    "embedding)",
)
