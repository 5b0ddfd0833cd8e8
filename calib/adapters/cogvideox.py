"""CogVideoX (CogVideoXTransformer3DModel): the first block's CogVideoXLayerNormZero output (video tokens)."""

from .base import Adapter

COGVIDEOX = Adapter(
    name="cogvideox",
    model_classes=("CogVideoXTransformer3DModel",),
    modulation_module="transformer_blocks.0.norm1",
    block_stacks=("transformer_blocks",),
    notes="norm1(hidden_states, encoder_hidden_states, temb)[0]; TeaCache4CogVideoX watches the timestep "
    "embedding emb instead, traced here as temb_rel_l1",
)
