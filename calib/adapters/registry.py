"""One adapter per transformer family, looked up by the transformer's class name."""

from __future__ import annotations

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


def _load_builtin_adapters() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import cogvideox, cosmos, flux, hunyuan_video, ltx_video, lumina2, mochi, pixart, qwenimage, sana, sd3, wan

    for adapter in (
        flux.FLUX,
        wan.WAN,
        hunyuan_video.HUNYUAN_VIDEO,
        cogvideox.COGVIDEOX,
        ltx_video.LTX_VIDEO,
        mochi.MOCHI,
        sd3.SD3,
        qwenimage.QWENIMAGE,
        lumina2.LUMINA2,
        sana.SANA,
        pixart.PIXART,
        cosmos.COSMOS,
    ):
        register(adapter)
