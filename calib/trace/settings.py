"""What a trace run generates (:class:`TraceSettings`) and the pipeline arguments it passes: ``--pipeline-arg``
values, the arguments calib sets itself, the dtypes ``--dtype`` takes."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import torch

from ..errors import CalibError
from ..models.loading import DTYPE_NAMES

MAX_STEPS = 10_000  # denoising steps; schedulers use 1-1000, and the tracer sizes buffers by it

# torch dtypes by the names --dtype takes (and the trace file records)
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# Pipeline arguments calib sets itself, with the option that sets them: --pipeline-arg may not give these.
CALIB_ARGUMENTS = {
    "prompt": "--prompts",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "generator": "--seeds",
    "output_type": None,  # "latent" when tracing, "np" when evaluating
    "return_dict": None,  # calib reads the pipeline's output object
    "height": "--height",
    "width": "--width",
    "num_frames": "--num-frames",
    "negative_prompt": "--negative-prompt",
    "true_cfg_scale": "--true-cfg-scale",
}
_ARGUMENT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_pipeline_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--pipeline-arg``: VALUE read as JSON (``64``, ``true``, ``{"scale": 0.5}``), else kept
    as the string it is (``negative_prompt_2=blurry``)."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep:
        raise CalibError(f"--pipeline-arg {text!r}: expected KEY=VALUE, e.g. max_sequence_length=256")
    if not _ARGUMENT_NAME.match(key):
        raise CalibError(f"--pipeline-arg {text!r}: {key!r} is not an argument name (letters, digits and _, "
                         "not starting with a digit)")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def recordable(value):
    """A pipeline argument as the trace and coefficient files record it: a JSON value as it is; anything else (the
    Python API can pass an image) as ``{"python_object": "PIL.Image.Image"}``, its type only -- a file cannot hold
    it, and a resume cannot tell two of them apart."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        kind = type(value)
        return {"python_object": f"{kind.__module__}.{kind.__qualname__}"}


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


@dataclass
class TraceSettings:
    """What a trace run generates: each prompt x seed is one generation.

    ``pipeline_kwargs``: further keyword arguments of the pipeline call (``--pipeline-arg``: JSON values; through
    Python anything, recorded by :func:`recordable`); the ones with fields of their own move to those;
    ``negative_prompt`` / ``true_cfg_scale`` are passed when given (true CFG of FLUX and Qwen-Image);
    ``dtype``: the dtype the model is loaded in (``None``: as it loads; the trace records the one it ran in);
    ``cpu_offload``: ``enable_model_cpu_offload()`` instead of moving the whole pipeline to the device.
    """

    steps: int = 30
    guidance: float = 3.0
    seeds: tuple[int, ...] = (0, 1)
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    record_blocks: bool = True
    pipeline_kwargs: dict = field(default_factory=dict)
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    dtype: str | None = None
    cpu_offload: bool = False

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 2:
            raise CalibError(f"--steps must be an integer >= 2, got {self.steps!r}")
        if self.steps > MAX_STEPS:  # before any buffer is sized by it
            raise CalibError(f"--steps {self.steps}: at most {MAX_STEPS} denoising steps")
        if not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance) and self.guidance >= 0):
            raise CalibError(f"--guidance must be a finite number >= 0, got {self.guidance!r}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise CalibError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise CalibError(f"--seeds has duplicates: {list(self.seeds)}")
        kwargs = dict(self.pipeline_kwargs or {})
        # Through Python, pipeline_kwargs may hold the arguments that have fields of their own: they move there
        # (so they are recorded and matched as those settings), unless the field says otherwise.
        for key in ("height", "width", "num_frames", "negative_prompt", "true_cfg_scale"):
            if key in kwargs:
                value = kwargs.pop(key)
                if getattr(self, key) is not None and getattr(self, key) != value:
                    raise CalibError(f"{key} is given twice, as {CALIB_ARGUMENTS[key]} {getattr(self, key)!r} and "
                                     f"as a pipeline argument {value!r}")
                setattr(self, key, value)
        self._check_fields()
        for key in kwargs:
            if not isinstance(key, str) or not _ARGUMENT_NAME.match(key):
                raise CalibError(f"--pipeline-arg {key!r}: not an argument name (letters, digits and _)")
            if key in CALIB_ARGUMENTS:
                how = CALIB_ARGUMENTS[key]
                raise CalibError(f"--pipeline-arg {key}: calib sets {key} itself"
                                 + (f"; use {how}" if how else ""))
        self.pipeline_kwargs = kwargs

    def _check_fields(self) -> None:
        for name in ("height", "width", "num_frames"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise CalibError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise CalibError(f"--negative-prompt must be text, got {type(self.negative_prompt).__name__}")
        if self.true_cfg_scale is not None:
            if not (isinstance(self.true_cfg_scale, (int, float)) and math.isfinite(self.true_cfg_scale)
                    and self.true_cfg_scale >= 0):
                raise CalibError(f"--true-cfg-scale must be a finite number >= 0, got {self.true_cfg_scale!r}")
            self.true_cfg_scale = float(self.true_cfg_scale)
        if self.dtype is not None:
            self.dtype = dtype_name(self.dtype)
            if self.dtype not in DTYPES:
                raise CalibError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        self.cpu_offload = bool(self.cpu_offload)

    def call_kwargs(self) -> dict:
        """The keyword arguments of the pipeline call besides prompt, steps, guidance, generator and output type:
        ``--pipeline-arg``s, size and the true-CFG arguments, each only when given."""
        kwargs = dict(self.pipeline_kwargs)
        for name in ("height", "width", "num_frames", "negative_prompt", "true_cfg_scale"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs

    def recorded(self) -> dict:
        """What the trace file stores (attribute ``trace_settings``) and a resume must match: every setting of
        the generations except the prompts and seeds (more of those extend a trace)."""
        return {
            "steps": int(self.steps),
            "guidance": float(self.guidance),
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
            "negative_prompt": self.negative_prompt,
            "true_cfg_scale": self.true_cfg_scale,
            "pipeline_args": {k: recordable(v) for k, v in self.pipeline_kwargs.items()},
            "dtype": self.dtype,
            "cpu_offload": self.cpu_offload,
            "record_blocks": bool(self.record_blocks),
        }
