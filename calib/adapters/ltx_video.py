"""LTX-Video (LTXVideoTransformer3DModel): the block modulates norm1(x) itself from scale_shift_table + temb."""

from .base import Adapter, call_argument, modulate


def ltx_modulated_input(block, args, kwargs):
    hidden = call_argument(block, "hidden_states", args, kwargs)
    temb = call_argument(block, "temb", args, kwargs)
    table = block.scale_shift_table
    ada = table[None, None].to(temb.device) + temb.reshape(hidden.shape[0], temb.size(1), table.shape[0], -1)
    shift, scale = ada.unbind(dim=2)[:2]
    return modulate(block.norm1(hidden), shift, scale)


LTX_VIDEO = Adapter(
    name="ltx_video",
    model_classes=("LTXVideoTransformer3DModel",),
    modulation_module=None,
    modulated_input=ltx_modulated_input,
    modulated_input_consumer="attn1",
    block_stacks=("transformer_blocks",),
    notes="first block's norm1(x) * (1 + scale_msa) + shift_msa from scale_shift_table + temb, "
    "as in TeaCache4LTX-Video",
)
