"""Resolve ``--model``: a built-in name, a local diffusers pipeline folder, a hub id, or ``module:function`` (your
own code that builds the pipeline)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

from .._io import load_json_file
from ..errors import CalibError

DEFAULT_MODEL = "builtin:digits"

# The --dtype names (torch dtype attribute names). The tracer maps them with torch; this module imports torch only
# when a dtype is resolved, so resolving --model stays light.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _digits(device):
    from . import digits

    return digits.load_pipeline(device=device)


def _wan_digits(device):
    from . import wan_digits

    return wan_digits.load_pipeline(device=device)


def _digits_lora(device):
    from . import digits_lora

    return digits_lora.load_pipeline(device=device)


def _digits_4step(device):
    from . import digits_fewstep

    return digits_fewstep.load_pipeline(steps=4, device=device)


def _digits_8step(device):
    from . import digits_fewstep

    return digits_fewstep.load_pipeline(steps=8, device=device)


BUILTIN: dict[str, Callable] = {"digits": _digits, "digits-lora": _digits_lora, "digits-4step": _digits_4step,
                                "digits-8step": _digits_8step, "wan-digits": _wan_digits}
BUILTIN_DESCRIPTIONS = {
    "digits": "FLUX transformer (0.6 M parameters) trained on scikit-learn's 8x8 digits",
    "digits-lora": "builtin:digits with a rank-4 LoRA (peft) that draws bold strokes",
    "digits-4step": "builtin:digits distilled to 4 steps without CFG (reflow); pass --steps 4 --guidance 1",
    "digits-8step": "builtin:digits distilled to 8 steps without CFG (reflow); pass --steps 8 --guidance 1",
    "wan-digits": "Wan transformer (0.24 M parameters) trained on 4-frame 12x12 clips of drifting digits",
}
# The variants of builtin:digits take its prompts (calib/data/digits_prompts.txt).
BUILTIN_PROMPTS = {"digits-lora": "digits", "digits-4step": "digits", "digits-8step": "digits"}


def builtin_prompts_name(name: str) -> str:
    """The name of the bundled prompts file (``calib/data/<name>_prompts.txt``) a built-in model uses."""
    return BUILTIN_PROMPTS.get(name, name)


def builtin_names() -> list[str]:
    return [f"builtin:{name}" for name in BUILTIN]


# ``package.module:function``: dotted Python names, one colon (a hub id has a slash, a Windows path a backslash).
FACTORY_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_factory_spec(spec: str) -> bool:
    return bool(FACTORY_SPEC.match(spec)) and not spec.startswith("builtin:") and not Path(spec).exists()


def load_factory(spec: str, device: str | None = "cpu"):
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
    if hasattr(pipe, "to") and device is not None:
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


def model_from_file(source, file) -> str:
    """The model a file (a trace, a manifest, a coefficient or results file) names, as a ``--model`` value that
    neither runs code nor downloads anything: a built-in name (``builtin:digits``) or an existing folder. Anything
    else -- ``module:function``, a hub id, a path that is not a folder -- is refused in one line that asks for
    ``--model``: only the command line may name code to run or a model to download. This is the one guard every
    command that loads a model named by a file calls before :func:`load_model`."""
    text = str(source).strip() if isinstance(source, str) else ""
    if text.startswith("builtin:") and text[len("builtin:"):] in BUILTIN:
        return text
    if text and not text.startswith("builtin:") and not is_factory_spec(text) and "\0" not in text:
        try:
            if Path(text).is_dir():
                return text
        except (OSError, ValueError):
            pass
    shown = repr(source) if len(repr(source)) <= 80 else repr(source)[:79] + "…"
    raise CalibError(f"{file}: its model.source {shown} is not a built-in model or an existing folder (calib never "
                     "runs code or downloads a model a file names); pass --model to say which pipeline to load")


ACCELERATE_HINT = ("diffusers needs accelerate to load this pipeline; install it with `pip install 'accelerate>=1.0'` "
                   "(a dependency of calib, missing from this environment)")


def _accelerate_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is None


def _gist(exc: Exception) -> str:
    """diffusers' error in one line; a missing .safetensors file says why calib wants one, a missing accelerate
    what to install."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(".")
    if "safetensors" in first and "no file named" in first:
        return (f"{first}. calib loads weights from .safetensors files only, never pickled .bin/.pt files; convert "
                "them once where you trust them (save_pretrained(..., safe_serialization=True))")
    # Without accelerate diffusers loads with low_cpu_mem_usage=False, which models that keep modules in float32
    # (Wan, ...) refuse: "low_cpu_mem_usage cannot be False when keep_in_fp32_modules is True".
    if ("low_cpu_mem_usage" in first or "accelerate" in first.lower()) and _accelerate_missing():
        return f"{first}: {ACCELERATE_HINT}"
    return first


def torch_dtype(dtype):
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; None stays None."""
    if dtype is None:
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise CalibError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` where diffusers renamed ``torch_dtype`` (and warns on it)."""
    try:
        from diffusers.utils import _resolve_dtype  # noqa: F401 - present since the rename
    except ImportError:
        return "torch_dtype"
    return "dtype"


def has_accelerator() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool(torch.cuda.is_available() or (xpu is not None and xpu.is_available())
                or (mps is not None and mps.is_available()))


def check_cpu_offload(device: str) -> None:
    """``--cpu-offload`` is possible here: an accelerator to run on, and accelerate to move the weights."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = str(device)
    if kind == "cpu" or kind == "meta":
        why = ("this machine has no accelerator torch can use (no CUDA, XPU or MPS device); drop --cpu-offload"
               if not has_accelerator() else
               f"--device {device} is not one: name the GPU (e.g. --device cuda:0), or drop --cpu-offload")
        raise CalibError("--cpu-offload keeps the weights in CPU memory and moves each model to the accelerator "
                         f"while it runs, but {why}")
    if _accelerate_missing():
        raise CalibError("--cpu-offload needs accelerate: `pip install 'accelerate>=1.0'`")


def _cast(pipe, dtype) -> None:
    """``pipe.to(dtype)`` for a pipeline built in code (built-in, module:function), keeping the modules a model
    lists in ``_keep_in_fp32_modules`` in float32 as ``from_pretrained(torch_dtype=...)`` would."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    models = [m for m in (getattr(pipe, "components", None) or {}).values() if isinstance(m, torch.nn.Module)]
    floats = [p.dtype for m in models for p in m.parameters() if p.is_floating_point()]
    if floats and all(d == dtype for d in floats):
        return
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "cast with to()" warning: the float32 modules are restored below
    try:
        pipe.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    if dtype == torch.float32:
        return
    for model in models:
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        for name, module in model.named_modules():
            if keep and any(k in name.split(".") for k in keep):
                module.to(torch.float32)


def _place(pipe, spec: str, device: str, dtype, cpu_offload: bool):
    """Convert to ``dtype`` and move to ``device``, or enable model CPU offload onto it."""
    if dtype is not None:
        if not hasattr(pipe, "to"):
            raise CalibError(f"--dtype: {type(pipe).__name__} from {spec} has no .to(); build it in that dtype")
        _cast(pipe, dtype)
    if cpu_offload:
        offload = getattr(pipe, "enable_model_cpu_offload", None)
        if not callable(offload):
            raise CalibError(f"--cpu-offload: {type(pipe).__name__} from {spec} is not a diffusers pipeline (it has no "
                             "enable_model_cpu_offload)")
        offload(device=device)
    elif hasattr(pipe, "to"):
        pipe.to(device)
    return pipe


def pipeline_class(spec: str):
    """The pipeline class ``spec`` loads, where that is known without loading it (a built-in model, a folder's
    model_index.json naming a diffusers class); None otherwise (hub ids, module:function)."""
    spec = (spec or DEFAULT_MODEL).strip()
    name = spec[len("builtin:") :] if spec.startswith("builtin:") else spec
    if spec.startswith("builtin:") or (name in BUILTIN and not Path(spec).exists()):
        if name in ("digits", "digits-lora"):
            from .digits import DigitsPipeline

            return DigitsPipeline
        if name in ("digits-4step", "digits-8step"):
            from .digits_fewstep import FewStepDigitsPipeline

            return FewStepDigitsPipeline
        if name == "wan-digits":
            from .wan_digits import WanDigitsPipeline

            return WanDigitsPipeline
        return None
    index = Path(spec) / "model_index.json"
    if not index.exists():
        return None
    try:  # a regular file under the JSON size limit, calib's depth limits: a FIFO there is refused, never opened
        class_name = load_json_file(index, what="a diffusers model_index.json").get("_class_name")
    except AttributeError:
        return None
    if not isinstance(class_name, str):
        return None
    import diffusers

    try:
        cls = getattr(diffusers, class_name, None)
    except Exception:  # diffusers' lazy import of a class whose backend is missing
        return None
    return cls if isinstance(cls, type) else None


def load_model(spec: str, device: str = "cpu", dtype=None, cpu_offload: bool = False):
    """Load a diffusers pipeline. Never executes code shipped with a model folder (no trust_remote_code).

    ``dtype`` (a torch dtype or its name): load the weights in it; ``cpu_offload``: keep them in CPU memory and let
    diffusers move each model to ``device`` while it runs (``enable_model_cpu_offload``) instead of moving the
    whole pipeline there."""
    spec = (spec or DEFAULT_MODEL).strip()
    dtype = torch_dtype(dtype)
    if cpu_offload:
        check_cpu_offload(device)  # before minutes of loading
    name = spec[len("builtin:") :] if spec.startswith("builtin:") else spec
    if spec.startswith("builtin:") or (name in BUILTIN and not Path(spec).exists()):
        if name not in BUILTIN:
            raise CalibError(f"no built-in model {name!r}; built-in models: {', '.join(builtin_names())}")
        if dtype is None and not cpu_offload:
            return BUILTIN[name](device)
        return _place(BUILTIN[name]("cpu"), spec, device, dtype, cpu_offload)
    if is_factory_spec(spec):
        if dtype is None and not cpu_offload:
            return load_factory(spec, device)
        return _place(load_factory(spec, None), spec, device, dtype, cpu_offload)
    from diffusers import DiffusionPipeline

    # No code shipped with the model runs, and nothing is unpickled: weights load from safetensors files only
    # (diffusers would otherwise fall back to torch.load on .bin/.pt files).
    kwargs = {"trust_remote_code": False, "use_safetensors": True}
    if dtype is not None:
        kwargs[_dtype_keyword()] = dtype
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
    return _place(pipe, spec, device, None, cpu_offload)
