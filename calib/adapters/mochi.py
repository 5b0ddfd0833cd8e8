"""Mochi (MochiTransformer3DModel): the first block's MochiRMSNormZero output."""

from .base import Adapter

MOCHI = Adapter(
    name="mochi",
    model_classes=("MochiTransformer3DModel",),
    modulation_module="transformer_blocks.0.norm1",
    block_stacks=("transformer_blocks",),
    notes="norm1(hidden_states, temb)[0], as in TeaCache4Mochi",
)
