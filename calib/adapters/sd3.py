"""Stable Diffusion 3 / 3.5 (SD3Transformer2DModel): the first JointTransformerBlock's AdaLayerNormZero output."""

from .base import Adapter

SD3 = Adapter(
    name="sd3",
    model_classes=("SD3Transformer2DModel",),
    modulation_module="transformer_blocks.0.norm1",
    block_stacks=("transformer_blocks",),
    notes="norm1(hidden_states, emb=temb)[0] (SD3.5's SD35AdaLayerNormZeroX also returns it first); "
    "skip_layers and ControlNet residuals added between blocks are not reproduced on a skipped step",
)
