"""Cosmos (CosmosTransformer3DModel, Cosmos-1.0 and Predict2): the first block's CosmosAdaLayerNormZero output."""

from .base import Adapter, BlockIO

COSMOS = Adapter(
    name="cosmos",
    model_classes=("CosmosTransformer3DModel",),
    modulation_module="transformer_blocks.0.norm1",
    block_stacks=("transformer_blocks",),
    block_io_overrides={"CosmosTransformerBlock": BlockIO(return_hidden_states_index=0)},
    temb_argument="embedded_timestep",
    notes="norm1(hidden_states, embedded_timestep, temb)[0] (after the learnable extra position embedding); "
    "ControlNet residuals passed to the blocks are not reproduced on a skipped step",
)
