"""Lumina-Image 2.0 (Lumina2Transformer2DModel): the first main layer's LuminaRMSNormZero output."""

from .base import Adapter, BlockIO

LUMINA2 = Adapter(
    name="lumina2",
    model_classes=("Lumina2Transformer2DModel",),
    modulation_module="layers.0.norm1",
    block_stacks=("layers",),  # the noise and context refiners run every step, as in TeaCache4Lumina2
    block_io_overrides={"Lumina2TransformerBlock": BlockIO(return_hidden_states_index=0)},
    notes="layers.0.norm1(joint tokens, temb)[0], as in TeaCache4Lumina2; the stack is the joint caption+image "
    "sequence. With CFG truncation the pipeline stops calling the uncond branch, whose stream then ends early",
)
