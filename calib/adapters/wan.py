"""Wan 2.1 / 2.2 (WanTransformer3DModel: text-to-video, image-to-video, TI2V and the two-expert A14B models).

A Wan block has no modulation layer: it computes ``norm1(x) * (1 + scale) + shift`` itself from its
``scale_shift_table + temb``. The indicator recomputes exactly that from the first block's arguments.
"""

from .base import Adapter, call_argument, modulate


def wan_modulated_input(block, args, kwargs):
    hidden = call_argument(block, "hidden_states", args, kwargs)
    temb = call_argument(block, "temb", args, kwargs)
    if temb.ndim == 4:  # Wan 2.2 TI2V: a timestep per token, temb (B, L, 6, D)
        shift, scale = (t.squeeze(2) for t in (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2])
    else:  # temb (B, 6, D)
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return modulate(block.norm1(hidden.float()), shift, scale).type_as(hidden)


WAN = Adapter(
    name="wan",
    model_classes=("WanTransformer3DModel",),
    modulation_module=None,
    modulated_input=wan_modulated_input,
    modulated_input_consumer="attn1",
    block_stacks=("blocks",),
    notes="first block's norm1(x) * (1 + scale_msa) + shift_msa, recomputed from scale_shift_table + temb; "
    "TeaCache's own Wan2.1 port watches the timestep embedding (e / e0) instead, traced here as temb_rel_l1. "
    "Wan2.2 A14B: transformer and transformer_2 are separate components with their own polynomials",
)
