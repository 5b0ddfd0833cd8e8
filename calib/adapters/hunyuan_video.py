"""HunyuanVideo (HunyuanVideoTransformer3DModel, T2V and I2V): the first double block's AdaLayerNormZero output."""

from .base import Adapter

HUNYUAN_VIDEO = Adapter(
    name="hunyuan_video",
    model_classes=("HunyuanVideoTransformer3DModel",),
    modulation_module="transformer_blocks.0.norm1",
    block_stacks=("transformer_blocks", "single_transformer_blocks"),
    notes="norm1(hidden_states, emb=temb)[0] of the first double block, as in TeaCache4HunyuanVideo (img_mod); "
    "the token-replace I2V variant's norm1 also returns the modulated tokens first",
)
