"""Resolve ``--model``: a built-in name, a local diffusers pipeline folder, or a hub id."""

from __future__ import annotations

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


def load_model(spec: str, device: str = "cpu", dtype=None):
    """Load a diffusers pipeline. Never executes code shipped with a model folder (no trust_remote_code)."""
    spec = (spec or DEFAULT_MODEL).strip()
    name = spec[len("builtin:") :] if spec.startswith("builtin:") else spec
    if spec.startswith("builtin:") or (name in BUILTIN and not Path(spec).exists()):
        if name not in BUILTIN:
            raise CalibError(f"no built-in model {name!r}; built-in models: {', '.join(builtin_names())}")
        return BUILTIN[name](device)
    from diffusers import DiffusionPipeline

    kwargs = {"trust_remote_code": False}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    path = Path(spec)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise CalibError(f"{spec}: not a diffusers pipeline folder (no model_index.json)")
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
        except Exception as exc:  # diffusers raises many types; the user needs the gist in one line
            raise CalibError(f"{spec}: could not load the pipeline: {str(exc).splitlines()[0]}") from None
    else:
        if "/" not in spec:
            raise CalibError(
                f"--model {spec!r} is neither a built-in model ({', '.join(builtin_names())}), "
                "an existing folder, nor a hub id like 'black-forest-labs/FLUX.1-dev'"
            )
        try:
            pipe = DiffusionPipeline.from_pretrained(spec, **kwargs)
        except Exception as exc:
            raise CalibError(
                f"{spec}: could not load from the hub ({str(exc).splitlines()[0]}); "
                "on an offline machine download it elsewhere and pass the folder"
            ) from None
    pipe.to(device)
    return pipe
