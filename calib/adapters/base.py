"""What calib must know about a transformer family, in one small object.

An adapter says where the modulated input comes from, which ModuleLists form the block stack, how each block's
outputs are laid out, and how CFG passes arrive. The tracer and the runtime use the same adapter, so what is
calibrated is what is gated. Imports: torch and the standard library only (diffusers is consulted when present).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# Shared with the runtime's hooks; re-exported here because the family adapters call them.
from ..hooking import call_argument, parameter_names  # noqa: F401

# The ModuleList names diffusers uses for block stacks, in the order they run.
DEFAULT_BLOCK_STACKS = (
    "transformer_blocks",
    "single_transformer_blocks",
    "blocks",
    "layers",
)


@dataclass(frozen=True)
class BlockIO:
    """Where a block's hidden states sit in its arguments and outputs (diffusers' TransformerBlockMetadata)."""

    return_hidden_states_index: int | None = 0
    return_encoder_hidden_states_index: int | None = None
    hidden_states_argument_name: str = "hidden_states"
    encoder_hidden_states_argument_name: str = "encoder_hidden_states"

    def argument(self, block: torch.nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
        return call_argument(block, name, args, kwargs)

    def hidden_states_in(self, block, args, kwargs) -> torch.Tensor:
        return self.argument(block, self.hidden_states_argument_name, args, kwargs)

    def encoder_hidden_states_in(self, block, args, kwargs) -> torch.Tensor | None:
        return self.argument(block, self.encoder_hidden_states_argument_name, args, kwargs)

    def hidden_states_out(self, output) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            return output
        return output[self.return_hidden_states_index]

    def pack(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> Any:
        """Build an output of the block's own layout from the given hidden states (used when a block is skipped)."""
        if self.return_encoder_hidden_states_index is None:
            return hidden_states
        out = [None, None]
        out[self.return_hidden_states_index] = hidden_states
        out[self.return_encoder_hidden_states_index] = encoder_hidden_states
        return tuple(out)


def diffusers_block_io(block: torch.nn.Module) -> BlockIO | None:
    """diffusers' own block metadata for this block class, when diffusers is installed and knows it."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except Exception:  # diffusers is optional for the runtime
        return None
    try:
        meta = TransformerBlockRegistry.get(type(block))
    except ValueError:
        return None
    return BlockIO(
        return_hidden_states_index=meta.return_hidden_states_index,
        return_encoder_hidden_states_index=meta.return_encoder_hidden_states_index,
        hidden_states_argument_name=getattr(meta, "hidden_states_argument_name", "hidden_states"),
        encoder_hidden_states_argument_name=getattr(
            meta, "encoder_hidden_states_argument_name", "encoder_hidden_states"
        ),
    )


def get_submodule(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    try:
        return root.get_submodule(dotted)
    except AttributeError as exc:
        raise LookupError(f"{type(root).__name__} has no submodule {dotted!r}") from exc


@dataclass(frozen=True)
class Adapter:
    """How calib hooks one transformer family.

    ``modulation_module`` is the dotted path of the layer (inside the first block) whose output is the timestep-
    modulated input TeaCache watches; its first output (or its only one) is taken. Families where no single layer
    produces it give ``modulated_input`` instead: a function ``(block, args, kwargs) -> Tensor`` computed from the
    first block's arguments before the block runs. ``modulated_input_consumer`` (optional, with ``modulated_input``)
    is the dotted path, inside the first block, of the layer the block itself feeds that same tensor to (its
    ``hidden_states`` argument, else its first one): the tracer reads it there instead of recomputing it, after
    checking once per tracer that the two are equal. The runtime always recomputes: it decides before the block runs.
    """

    name: str
    model_classes: tuple[str, ...]
    modulation_module: str | None = "transformer_blocks.0.norm1"
    modulated_input: Callable[[torch.nn.Module, tuple, dict], torch.Tensor] | None = None
    modulated_input_consumer: str | None = None
    block_stacks: tuple[str, ...] = DEFAULT_BLOCK_STACKS
    # Block output layout for blocks diffusers' registry does not know (keyed by block class name).
    block_io_overrides: dict[str, BlockIO] = field(default_factory=dict)
    # How a pipeline lays out CFG: batched rows (diffusers concatenates [negative, positive]) or, for separate
    # calls without a cache_context, the call order within a step.
    cfg_batch_order: tuple[str, ...] = ("uncond", "cond")
    cfg_call_order: tuple[str, ...] = ("cond", "uncond")
    # Transformer arguments whose first dimension is not the batch, though it may equal it (a cond-only step runs
    # the call on half the batch rows of every other tensor argument).
    unbatched_arguments: tuple[str, ...] = ()
    # The first block's argument holding the timestep embedding (traced as the alternative indicator temb_rel_l1).
    temb_argument: str = "temb"
    notes: str = ""

    def __post_init__(self):
        if not self.name:
            raise ValueError("adapter needs a name")
        if self.modulation_module is None and self.modulated_input is None:
            raise ValueError(f"adapter {self.name!r} needs modulation_module or modulated_input")
        if self.modulated_input_consumer is not None and self.modulated_input is None:
            raise ValueError(f"adapter {self.name!r}: modulated_input_consumer needs modulated_input to check it against")

    # -- structure -----------------------------------------------------------------------------------------
    def blocks(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """The block stack in execution order, as (dotted name, block)."""
        found = []
        for stack in self.block_stacks:
            modules = getattr(transformer, stack, None)
            if isinstance(modules, torch.nn.ModuleList):
                found.extend((f"{stack}.{i}", block) for i, block in enumerate(modules))
        if not found:
            raise LookupError(
                f"{type(transformer).__name__} has none of the block stacks {list(self.block_stacks)}"
            )
        return found

    def block_io(self, block: torch.nn.Module) -> BlockIO:
        override = self.block_io_overrides.get(type(block).__name__)
        if override is not None:
            return override
        return diffusers_block_io(block) or BlockIO()

    def modulation_layer(self, transformer: torch.nn.Module) -> torch.nn.Module | None:
        if self.modulated_input is not None:
            return None
        return get_submodule(transformer, self.modulation_module)

    def residual(self, hidden_out: torch.Tensor, stack_input: torch.Tensor) -> torch.Tensor | None:
        """The block stack's residual: the last block's output hidden states minus the first block's input ones.

        None when the two differ in shape (a stack whose last block also returns other tokens): no residual can be
        cached then, the tracer records NaN for it and the runtime computes every step.
        """
        if hidden_out.shape != stack_input.shape:
            return None
        return (hidden_out - stack_input).detach()

    @property
    def indicator_name(self) -> str:
        return self.modulation_module or f"{self.name}:modulated_input"


def first_tensor(output) -> torch.Tensor:
    """The first tensor of a module output (norm layers return (normed, gate, shift, ...))."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "sample"):
        return output.sample
    raise TypeError(f"cannot find a tensor in {type(output).__name__}")


def transformer_output(output) -> torch.Tensor:
    """The denoiser prediction from a transformer's return value (tuple or Transformer2DModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation as diffusers' blocks write it: ``normed * (1 + scale) + shift``."""
    return normed * (1 + scale) + shift


def ada_norm_single_input(block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The modulated input of a PixArt-style block (``norm_type="ada_norm_single"``, also Sana): the block's
    ``scale_shift_table[None] + timestep.reshape(B, 6, -1)`` gives shift and scale of the attention branch, applied
    to ``norm1(hidden_states)`` exactly as the block's forward does."""
    hidden = call_argument(block, "hidden_states", args, kwargs)
    temb = call_argument(block, "timestep", args, kwargs)
    shift, scale = (block.scale_shift_table[None] + temb.reshape(hidden.shape[0], 6, -1)).chunk(6, dim=1)[:2]
    return modulate(block.norm1(hidden), shift, scale).to(hidden.dtype)
