"""Sana (SanaTransformer2DModel): the block modulates norm1(x) from scale_shift_table + the timestep embedding."""

from .base import Adapter, ada_norm_single_input

SANA = Adapter(
    name="sana",
    model_classes=("SanaTransformer2DModel",),
    modulation_module=None,
    modulated_input=ada_norm_single_input,
    modulated_input_consumer="attn1",
    block_stacks=("transformer_blocks",),
    temb_argument="timestep",
    notes="first block's norm1(x) * (1 + scale_msa) + shift_msa from scale_shift_table + timestep (the AdaLN-single "
    "embedding); ControlNet residuals between blocks are not reproduced on a skipped step",
)
