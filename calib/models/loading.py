"""Resolve ``--model``: a built-in name, a local diffusers pipeline folder, a hub id, or ``module:function`` (your
own code that builds the pipeline)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

from ..errors import CalibError

DEFAULT_MODEL = "builtin:digits"


def _digits(device):
    from . import digits

    return digits.load_pipeline(device=device)


def _wan_digits(device):
    from . import wan_digits

    return wan_digits.load_pipeline(device=device)


BUILTIN: dict[str, Callable] = {"digits": _digits, "wan-digits": _wan_digits}
BUILTIN_DESCRIPTIONS = {
    "digits": "FLUX transformer (0.6 M parameters) trained on scikit-learn's 8x8 digits",
    "wan-digits": "Wan transformer (0.24 M parameters) trained on 4-frame 12x12 clips of drifting digits",
}


def builtin_names() -> list[str]:
    return [f"builtin:{name}" for name in BUILTIN]


# ``package.module:function``: dotted Python names, one colon (a hub id has a slash, a Windows path a backslash).
FACTORY_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_factory_spec(spec: str) -> bool:
    return bool(FACTORY_SPEC.match(spec)) and not spec.startswith("builtin:") and not Path(spec).exists()


def load_factory(spec: str, device: str = "cpu"):
    """``module:function``: import the module (from the current folder or the installed packages) and call the
    function with no arguments; it returns the pipeline to trace (one built with quantisation, LoRAs fused, or a
    class diffusers cannot load from a folder). This runs the user's own code, named on the command line; a model
    folder or hub id never runs code (``trust_remote_code=False``)."""
    import importlib
    import os

    module_name, attr = spec.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would; the console script does not add it
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise CalibError(f"--model {spec}: no module {exc.name!r} (in the current folder or installed)") from None
        raise
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CalibError(f"--model {spec}: module {module_name!r} has no function {attr!r}")
    _check_takes_no_arguments(spec, factory)
    try:
        pipe = factory()
    except Exception as exc:  # the user's own code failed: show its traceback, then say whose it is
        _print_factory_traceback(spec, exc)
        raise CalibError(f"--model {spec}: your factory {attr}() raised {type(exc).__name__}: {_gist(exc)} "
                         "(above: where your code failed)") from None
    if not callable(pipe) or not hasattr(pipe, "transformer"):
        raise CalibError(f"--model {spec}: {attr}() returned {type(pipe).__name__}, not a pipeline with a transformer")
    if hasattr(pipe, "to"):
        pipe.to(device)
    return pipe


def _print_factory_traceback(spec: str, exc: BaseException) -> None:
    """The frames of the user's factory (calib's own call frame left out), so they can see where their code failed."""
    import traceback

    here = str(Path(__file__).resolve().parents[1])
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not str(Path(f.filename).resolve()).startswith(here)]
    lines = [f"--model {spec}: where your factory failed (most recent call last):\n"]
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    sys.stderr.write("".join(lines))


def _check_takes_no_arguments(spec: str, factory) -> None:
    """calib calls the factory with no arguments: one that needs some is refused before it is called."""
    import inspect

    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: just call it
        return
    required = [p.name for p in signature.parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise CalibError(f"--model {spec}: {getattr(factory, '__name__', 'the factory')}() needs arguments "
                         f"({', '.join(required)}); calib calls it with none — give them defaults or wrap it in a "
                         "function that takes none")


# A hub id: ``org/name`` (letters, digits, '-', '_', '.'), as the Hugging Face hub spells repository ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def model_from_file(source, file) -> str:
    """The model a file (a coefficient, trace, manifest or results file) names, as a ``--model`` value that runs no
    code: a built-in name, an existing folder or a hub id. A file never names code to run, so ``module:function``
    (or anything else) is refused in one line that asks for ``--model``; only the command line may name a factory."""
    text = str(source).strip() if isinstance(source, str) else ""
    if text.startswith("builtin:") and text[len("builtin:"):] in BUILTIN:
        return text
    if text and not is_factory_spec(text) and not text.startswith("builtin:"):
        path = Path(text)
        try:
            if path.is_dir():
                return text
        except OSError:
            pass
        if HUB_ID.match(text) and not path.exists() and ".." not in text.split("/"):
            return text
    shown = repr(source) if len(repr(source)) <= 80 else repr(source)[:79] + "…"
    raise CalibError(f"{file}: its model.source {shown} is not a built-in model, an existing folder or a hub id "
                     "(calib never runs code a file names); pass --model to say which pipeline to load")


def _gist(exc: Exception) -> str:
    """diffusers' error in one line; a missing .safetensors file says why calib wants one."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(".")
    if "safetensors" in first and "no file named" in first:
        return (f"{first}. calib loads weights from .safetensors files only, never pickled .bin/.pt files; convert "
                "them once where you trust them (save_pretrained(..., safe_serialization=True))")
    return first


def load_model(spec: str, device: str = "cpu", dtype=None):
    """Load a diffusers pipeline. Never executes code shipped with a model folder (no trust_remote_code)."""
    spec = (spec or DEFAULT_MODEL).strip()
    name = spec[len("builtin:") :] if spec.startswith("builtin:") else spec
    if spec.startswith("builtin:") or (name in BUILTIN and not Path(spec).exists()):
        if name not in BUILTIN:
            raise CalibError(f"no built-in model {name!r}; built-in models: {', '.join(builtin_names())}")
        return BUILTIN[name](device)
    if is_factory_spec(spec):
        return load_factory(spec, device)
    from diffusers import DiffusionPipeline

    # No code shipped with the model runs, and nothing is unpickled: weights load from safetensors files only
    # (diffusers would otherwise fall back to torch.load on .bin/.pt files).
    kwargs = {"trust_remote_code": False, "use_safetensors": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    path = Path(spec)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise CalibError(f"{spec}: not a diffusers pipeline folder (no model_index.json)")
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
        except Exception as exc:  # diffusers raises many types; the user needs the gist in one line
            raise CalibError(f"{spec}: could not load the pipeline: {_gist(exc)}") from None
    else:
        if "/" not in spec:
            raise CalibError(
                f"--model {spec!r} is neither a built-in model ({', '.join(builtin_names())}), "
                "an existing folder, a hub id like 'black-forest-labs/FLUX.1-dev', nor module:function"
            )
        try:
            pipe = DiffusionPipeline.from_pretrained(spec, **kwargs)
        except Exception as exc:
            raise CalibError(
                f"{spec}: could not load from the hub ({_gist(exc)}); "
                "on an offline machine download it elsewhere and pass the folder"
            ) from None
    pipe.to(device)
    return pipe
