"""Qwen-Image (QwenImageTransformer2DModel): the image stream's img_norm1(x) modulated by img_mod(temb)."""

from .base import Adapter, call_argument


def qwenimage_modulated_input(block, args, kwargs):
    hidden = call_argument(block, "hidden_states", args, kwargs)
    temb = call_argument(block, "temb", args, kwargs)
    index = call_argument(block, "modulate_index", args, kwargs)
    img_mod1 = block.img_mod(temb).chunk(2, dim=-1)[0]
    return block._modulate(block.img_norm1(hidden), img_mod1, index)[0]


QWENIMAGE = Adapter(
    name="qwenimage",
    model_classes=("QwenImageTransformer2DModel",),
    modulation_module=None,
    modulated_input=qwenimage_modulated_input,
    modulated_input_consumer="attn",
    block_stacks=("transformer_blocks",),
    notes="first block's img_norm1(x) modulated by the first chunk of img_mod(temb), recomputed with the block's "
    "own _modulate (one extra img_mod linear per step); ControlNet residuals between blocks are not reproduced "
    "on a skipped step",
)
