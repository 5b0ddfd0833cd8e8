"""FLUX.1 (FluxTransformer2DModel): TeaCache watches the first double block's AdaLayerNormZero output."""

from .base import Adapter

FLUX = Adapter(
    name="flux",
    model_classes=("FluxTransformer2DModel",),
    modulation_module="transformer_blocks.0.norm1",
    block_stacks=("transformer_blocks", "single_transformer_blocks"),
    unbatched_arguments=("img_ids", "txt_ids"),  # (tokens, 3): one set of position ids for every batch row
    notes="norm1(hidden_states, emb=temb)[0], as in TeaCache4FLUX",
)
