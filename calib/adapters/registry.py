"""One adapter per transformer family, looked up by the transformer's class name."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch

from ..errors import CalibError
from .base import Adapter

_ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    for cls in adapter.model_classes:
        _ADAPTERS[cls] = adapter
    return adapter


def supported_classes() -> list[str]:
    _load_builtin_adapters()
    return sorted(_ADAPTERS)


def custom_adapter(modulation_module: str, block_stacks: tuple[str, ...] | None = None) -> Adapter:
    """An adapter for a class calib does not know: the user names the modulation layer."""
    kwargs = {"block_stacks": tuple(block_stacks)} if block_stacks else {}
    return Adapter(name="custom", model_classes=(), modulation_module=modulation_module, **kwargs)


def get_adapter(transformer: torch.nn.Module | str, modulation_module: str | None = None) -> Adapter:
    """The adapter for this transformer (or class name); ``modulation_module`` forces a custom one."""
    _load_builtin_adapters()
    name = transformer if isinstance(transformer, str) else type(transformer).__name__
    if modulation_module:
        return custom_adapter(modulation_module)
    if name in _ADAPTERS:
        return _ADAPTERS[name]
    raise CalibError(
        f"calib has no adapter for {name}; supported: {', '.join(supported_classes())}. "
        "For another class pass --modulation-module (e.g. --modulation-module transformer_blocks.0.norm1)"
    )


_loaded = False
NOT_FAMILIES = ("base", "identity", "registry")  # the package's modules that hold no family


def _load_builtin_adapters() -> None:
    """Register every :class:`Adapter` a module of this package defines at its top level: a new family is one
    file here, found without being listed. Imported on first look-up, not with the package (they are many)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.name in NOT_FAMILIES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Adapter):
                for cls in value.model_classes:
                    _ADAPTERS.setdefault(cls, value)  # an adapter registered before the first look-up is kept
