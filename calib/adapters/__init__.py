"""Adapters: one per transformer family, shared by the tracer and the runtime."""

from .base import Adapter, BlockIO, first_tensor, transformer_output
from .identity import config_hash, model_identity
from .registry import custom_adapter, get_adapter, register, supported_classes

__all__ = [
    "Adapter",
    "BlockIO",
    "config_hash",
    "custom_adapter",
    "first_tensor",
    "get_adapter",
    "model_identity",
    "register",
    "supported_classes",
    "transformer_output",
]
