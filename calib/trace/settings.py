"""What a trace run generates (:class:`TraceSettings`) and the pipeline arguments it passes: ``--pipeline-arg``
values, the arguments calib sets itself, the dtypes ``--dtype`` takes."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import torch

from .._io import parse_json
from ..errors import CalibError
from ..models.loading import DTYPE_NAMES
from ..store import MAX_STEPS as STORE_MAX_STEPS

MAX_STEPS = STORE_MAX_STEPS  # denoising steps; schedulers use 1-1000, and the tracer sizes buffers by it
MAX_SIZE = 16_384  # --height / --width in pixels: a pipeline allocates latents by them
MAX_FRAMES = 4_096  # --num-frames
MAX_PER_PROMPT = 64  # num_images_per_prompt and the like: each is one more image in every batch
MAX_TEXT = 10_000  # characters of a text argument (a negative prompt, a mode name)
# Arguments that count outputs per prompt (num_images_per_prompt, num_videos_per_prompt, ...) or a batch.
_COUNT_ARGUMENT = re.compile(r"^(num_\w+_per_prompt|batch_size)$")
# Arguments a pipeline takes as tensors (latents, prompt_embeds, pooled_prompt_embeds, ..._attention_mask): the
# command line and files give JSON, never a tensor; only the Python API can pass one.
_TENSOR_ARGUMENT = re.compile(r"^(\w*latents|\w*_embeds|\w*_embeds_mask|\w*_attention_mask)$")

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
        value = parse_json(raw)  # calib's limits: no 100,000-deep list, no 5,000-digit integer
    except json.JSONDecodeError:
        value = raw
    except ValueError as exc:
        raise CalibError(f"--pipeline-arg {key}: {exc}") from None
    return key, value


def _non_finite(value, depth: int = 0) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def _is_json(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))


def check_pipeline_args(kwargs: dict, *, where: str = "--pipeline-arg") -> dict:
    """Refuse, in one line before any model is loaded, pipeline arguments calib cannot pass safely, whether they
    come from ``--pipeline-arg`` or from a file (a coefficient file's ``calibration.pipeline.pipeline_args``,
    ``where`` names it): a name that is not an argument name or that calib sets itself (:data:`CALIB_ARGUMENTS`:
    ``output_type``, ``num_inference_steps``, ...), a NaN or infinite number, text over :data:`MAX_TEXT`
    characters, an output count (``num_images_per_prompt``, ``batch_size``) that is not an integer in
    1..:data:`MAX_PER_PROMPT`, and JSON for an argument the pipeline takes as a tensor (``latents``,
    ``prompt_embeds``, ...). Values the Python API passes (tensors, images) are the caller's. Returns ``kwargs``."""
    for key, value in kwargs.items():
        if not isinstance(key, str) or not _ARGUMENT_NAME.match(key):
            raise CalibError(f"{where} {str(key)[:60]!r}: not an argument name (letters, digits and _)")
        label = f"{where} {key}"
        if key in CALIB_ARGUMENTS:
            how = CALIB_ARGUMENTS[key]
            raise CalibError(f"{label}: calib sets {key} itself" + (f"; use {how}" if how else ""))
        if not _is_json(value) or (isinstance(value, dict) and set(value) == {"python_object"}):
            continue  # a tensor or an image from the Python API, or recordable()'s record of one
        if _non_finite(value):
            raise CalibError(f"{label}: {json.dumps(value, allow_nan=True, default=repr)[:60]} is not a finite "
                             "number")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise CalibError(f"{label}: {len(value):,} characters of text; at most {MAX_TEXT:,}")
        if _COUNT_ARGUMENT.match(key) and (isinstance(value, bool) or not isinstance(value, int)
                                           or not 1 <= value <= MAX_PER_PROMPT):
            raise CalibError(f"{label}: must be an integer from 1 to {MAX_PER_PROMPT} (outputs per prompt in every "
                             f"batch), got {json.dumps(value)[:60]}")
        if _TENSOR_ARGUMENT.match(key):
            raise CalibError(f"{label}: the pipeline takes a tensor here, which the command line and files cannot "
                             f"give (got {json.dumps(value)[:40]}); pass it through the Python API "
                             f"(pipeline_kwargs={{{key!r}: tensor}})")
    return kwargs


# The fields of a calibration.pipeline section (calib.store.PIPELINE_FIELDS) besides pipeline_args, checked as the
# options that set them: what a coefficient file asks calib eval to generate with.
def check_pipeline_section(section: dict | None, source) -> None:
    """A coefficient file's ``calibration.pipeline`` (how its traces called the pipeline, which ``calib eval``
    calls it with again) checked like the command line's options: sizes, frames, negative prompt, true-CFG scale,
    dtype and :func:`check_pipeline_args` on its ``pipeline_args``. One line naming the file and field."""
    if section is None:
        return
    if not isinstance(section, dict):
        raise CalibError(f"{source}: calibration.pipeline: expected an object")
    where = f"{source}: calibration.pipeline"
    for name, high in (("height", MAX_SIZE), ("width", MAX_SIZE), ("num_frames", MAX_FRAMES)):
        value = section.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high):
            raise CalibError(f"{where}.{name}: must be an integer from 1 to {high:,}, got {json.dumps(value)[:40]}")
    negative = section.get("negative_prompt")
    if negative is not None and (not isinstance(negative, str) or len(negative) > MAX_TEXT):
        raise CalibError(f"{where}.negative_prompt: must be text of at most {MAX_TEXT:,} characters")
    scale = section.get("true_cfg_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale < 0):
        raise CalibError(f"{where}.true_cfg_scale: must be a finite number >= 0, got {json.dumps(scale)[:40]}")
    dtype = section.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise CalibError(f"{where}.dtype: {json.dumps(dtype)[:40]} is not one of {', '.join(DTYPES)}")
    args = section.get("pipeline_args")
    if args is not None and not isinstance(args, dict):
        raise CalibError(f"{where}.pipeline_args: expected an object")
    check_pipeline_args(dict(args or {}), where=f"{where}.pipeline_args")


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
        self.pipeline_kwargs = check_pipeline_args(kwargs)

    def _check_fields(self) -> None:
        for name, high in (("height", MAX_SIZE), ("width", MAX_SIZE), ("num_frames", MAX_FRAMES)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise CalibError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
            if value is not None and value > high:
                raise CalibError(f"--{name.replace('_', '-')} {value}: at most {high:,}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise CalibError(f"--negative-prompt must be text, got {type(self.negative_prompt).__name__}")
        if self.negative_prompt is not None and len(self.negative_prompt) > MAX_TEXT:
            raise CalibError(f"--negative-prompt: {len(self.negative_prompt):,} characters; at most {MAX_TEXT:,}")
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
