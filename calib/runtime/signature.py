"""The validity signature of a coefficient or schedule file: what the calibration was measured on (the weights, the
model and scheduler configs, the step count and its noise levels, the latent shape, the guidance), and the one place
the runtime compares it with what it sees (torch and the standard library only).

The digests are computed here, by the tracer at trace time (``calib trace`` stores them in the trace file) and by
the runtime at ``apply``, so both sides hash alike:

* :func:`weights_digest`: ``sha256:`` over every parameter of the transformer, in name order: its name, shape and
  dtype, then a fixed strided sample of at most :data:`SAMPLED_VALUES` of its values (flat indices ``0, s, 2s, ...``
  with ``s = max(1, numel // SAMPLED_VALUES)``) as little-endian float32 bytes. Cheap on a 12B model (a few
  thousand tiny reads), identical on every reload of the same weights; a change to values outside the sample goes
  unseen. None where the weights cannot be read (offloaded to the meta device).
* :func:`config_digest`: ``sha256:`` of a config's public keys as sorted JSON (the model's config hash,
  :func:`calib.adapters.config_hash`, is the same function of the transformer's config).
* :func:`values_digest`: ``sha256:`` of a list of numbers (a generation's first ``steps`` sigmas or timesteps) as
  little-endian float32 bytes.

:class:`SignatureCheck` compares a file's ``signature`` (and, for files without one, the ``model.config_hash`` they
always had) with the model at ``apply`` and with each generation at its first transformer call; each mismatched
field warns once per handle, or raises :class:`~calib.runtime.errors.SignatureMismatchError` with ``strict=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import warnings
from typing import Any

import torch

from calib.adapters import model_identity
from calib.adapters.identity import config_dict

from .errors import ModelMismatchError, SignatureMismatchError

SAMPLED_VALUES = 64
WEIGHTS_SAMPLE = "sampled-v1"  # signature.weights_sample: the sampling above; another name is not compared

# When each field is compared (docs/runtime.md): at apply, and at the first transformer call of every generation.
APPLY_FIELDS = ("config_hash", "weights", "dtype", "scheduler", "scheduler_config")
GENERATION_FIELDS = ("steps", "sigmas", "timesteps", "latent_shape", "guidance")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def weights_digest(module: torch.nn.Module) -> str | None:
    """The sampled digest of ``module``'s parameters (see the module docstring); None when they cannot be read."""
    h = hashlib.sha256()
    params = sorted(module.named_parameters(), key=lambda item: item[0])
    if not params:
        return None
    with torch.no_grad():
        for name, p in params:
            if p.is_meta:
                return None  # offloaded (accelerate's sequential offload): nothing to read
            h.update(f"{name}\0{tuple(p.shape)}\0{p.dtype}\0".encode("utf-8"))
            try:
                flat = p.detach().reshape(-1)
                stride = max(1, flat.numel() // SAMPLED_VALUES)
                sample = flat[::stride][:SAMPLED_VALUES].to(torch.float32).cpu()
                h.update(struct.pack(f"<{sample.numel()}f", *sample.tolist()))
            except (RuntimeError, TypeError, ValueError, NotImplementedError):
                h.update(b"unsampled")  # a quantized or otherwise opaque tensor: its name, shape and dtype only
    return "sha256:" + h.hexdigest()


def config_digest(obj) -> str | None:
    """``sha256:`` of the public keys of ``obj.config`` (a scheduler's, a model's), None without a config."""
    if getattr(obj, "config", None) is None:
        return None
    blob = json.dumps(config_dict(obj), sort_keys=True, default=str, separators=(",", ":"))
    return _sha(blob.encode("utf-8"))


def values_digest(values) -> str | None:
    """``sha256:`` of numbers as little-endian float32 (NaN or none: None)."""
    if values is None:
        return None
    values = [float(v) for v in values]
    if not values or not all(math.isfinite(v) for v in values):
        return None
    return _sha(struct.pack(f"<{len(values)}f", *values))


def running_dtype(module: torch.nn.Module) -> str | None:
    """The dtype the module runs in (``float32``, ``bfloat16``, ...): its ``dtype``, else its first float parameter's."""
    dtype = getattr(module, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        first = next((p for p in module.parameters() if p.is_floating_point()), None)
        dtype = first.dtype if first is not None else None
    return None if dtype is None else str(dtype).replace("torch.", "")


def _floats(values) -> list[float] | None:
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.detach().float().cpu().reshape(-1).tolist()]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def schedule_digests(sigmas, timesteps, steps: int) -> dict:
    """``{"sigmas": ..., "timesteps": ...}``: the digests of the first ``steps`` values of each (None where unknown)."""
    out = {}
    for name, values in (("sigmas", sigmas), ("timesteps", timesteps)):
        floats = _floats(values)
        out[name] = values_digest(floats[:steps]) if floats is not None and len(floats) >= steps else None
    return out


# -- the file's side ------------------------------------------------------------------------------------------------
def _is_digest(value) -> bool:
    return isinstance(value, str) and value.startswith("sha256:") and len(value) <= 80


def check_signature(doc: dict, source: str, fail) -> dict | None:
    """The document's ``signature`` object, its fields checked as far as the runtime reads them (``fail(source,
    where, what)`` raises); None when the file has none."""
    signature = doc.get("signature")
    if signature is None:
        return None
    if not isinstance(signature, dict):
        fail(source, "signature", "expected an object")
    for name in ("weights", "config_hash"):
        value = signature.get(name)
        if value is not None and not (isinstance(value, dict)
                                      and all(isinstance(k, str) and _is_digest(v) for k, v in value.items())):
            fail(source, f"signature.{name}", "expected {component: \"sha256:HEX\"}")
    for name in ("sigmas", "timesteps"):
        if signature.get(name) is not None and not _is_digest(signature[name]):
            fail(source, f"signature.{name}", "expected \"sha256:HEX\"")
    scheduler = signature.get("scheduler")
    if scheduler is not None and not (isinstance(scheduler, dict) and all(
            v is None or isinstance(v, str) for v in scheduler.values())):
        fail(source, "signature.scheduler", "expected {\"class\": NAME, \"config_hash\": \"sha256:HEX\"}")
    steps = signature.get("steps")
    if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        fail(source, "signature.steps", "expected an integer >= 1")
    shape = signature.get("latent_shape")
    if shape is not None and not (isinstance(shape, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape)):
        fail(source, "signature.latent_shape", "expected a list of integers")
    guidance = signature.get("guidance")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)):
        fail(source, "signature.guidance", "expected a finite number")
    for name in ("dtype", "weights_sample"):
        if signature.get(name) is not None and not isinstance(signature[name], str):
            fail(source, f"signature.{name}", "expected a string")
    return dict(signature)


# -- the runtime's side ---------------------------------------------------------------------------------------------
def _short(value) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19] + "…"
    return repr(value)


class SignatureCheck:
    """Compares one handle's file with what the runtime sees: :meth:`check_component` and :meth:`check_scheduler`
    at ``apply``, :meth:`generation_seen` at the first transformer call of each generation (the engine calls it).

    Every mismatch is kept (``mismatches``: ``{"field", "component", "expected", "seen"}``, once per field and
    component) and warned once, or raised as :class:`SignatureMismatchError` when ``strict``."""

    def __init__(self, config, *, strict: bool = False, what: str = "calibration", pipe=None):
        self.config = config
        self.signature: dict = getattr(config, "signature", None) or {}
        self.strict = bool(strict)
        self.what = what
        self.pipe = pipe  # a pipeline exposes the guidance of the generation (diffusers' _guidance_scale)
        self.mismatches: list[dict] = []
        self._seen: set = set()

    @property
    def source(self) -> str:
        return getattr(self.config, "path", None) or "this file"

    def mismatch(self, field: str, expected, seen, component: str | None = None, why: str = "") -> None:
        """Record (once per field and component), then warn or, when strict, raise."""
        key = (field, component)
        if key in self._seen:
            return
        self._seen.add(key)
        self.mismatches.append({"field": field, "component": component, "expected": expected, "seen": seen})
        where = f"{component}: " if component else ""
        message = (f"{where}signature field {field!r} differs from {self.source}: the file's {_short(expected)}, "
                   f"seen {_short(seen)}{'; ' + why if why else ''}; the {self.what} may not hold")
        if self.strict:
            raise SignatureMismatchError(message + " (strict=True refuses it)")
        warnings.warn(message + " — calibrate this setup with `calib trace` (strict=True refuses it)", stacklevel=5)

    # -- at apply ------------------------------------------------------------------------------------------------
    def check_component(self, name: str, transformer: torch.nn.Module, allow_model_mismatch: bool) -> None:
        """The model class (another refuses unless ``allow_model_mismatch``, then warns), then the config hash,
        the sampled weights digest and the dtype of one component."""
        config, what = self.config, self.what
        plural = what.endswith("s")
        identity = model_identity(transformer)
        if identity["class"] != config.model_class:
            message = (f"{what} in {config.path or 'this config'} {'were' if plural else 'was'} calibrated for "
                       f"{config.model_class}, not {identity['class']}")
            if not allow_model_mismatch:
                raise ModelMismatchError(
                    message + f"; pass allow_model_mismatch=True to use {'them' if plural else 'it'} anyway")
            warnings.warn(message, stacklevel=5)
            return  # another class: its config and weights differ by construction
        signature = self.signature
        expected = (signature.get("config_hash") or {}).get(name) or config.config_hash
        if expected and identity["config_hash"] != expected:
            self.mismatch("config_hash", expected, identity["config_hash"], name,
                          f"config differs from the calibrated one ({config.source or config.model_class})")
        weights = (signature.get("weights") or {}).get(name)
        if weights and signature.get("weights_sample", WEIGHTS_SAMPLE) == WEIGHTS_SAMPLE:
            seen = weights_digest(transformer)
            if seen is not None and seen != weights:
                self.mismatch("weights", weights, seen, name, "other weights than the calibrated ones")
        dtype = signature.get("dtype")
        if dtype:
            seen = running_dtype(transformer)
            if seen is not None and seen != dtype:
                self.mismatch("dtype", dtype, seen, name)

    def check_scheduler(self, scheduler) -> None:
        """The scheduler's class and config hash (a pipeline's; a bare transformer has none to compare)."""
        expected = self.signature.get("scheduler") or {}
        if scheduler is None or not expected:
            return
        if expected.get("class") and type(scheduler).__name__ != expected["class"]:
            self.mismatch("scheduler", expected["class"], type(scheduler).__name__)
            return
        seen = config_digest(scheduler)
        if expected.get("config_hash") and seen is not None and seen != expected["config_hash"]:
            self.mismatch("scheduler_config", expected["config_hash"], seen)

    # -- at each generation --------------------------------------------------------------------------------------
    @property
    def watches_generations(self) -> bool:
        return any(self.signature.get(f) is not None for f in GENERATION_FIELDS)

    def generation_seen(self, engine, component: str, latent: torch.Tensor | None) -> None:
        """The first call of ``component`` in a generation: its step count, the scheduler's sigmas and timesteps
        for it, the latent's shape (without the batch) and the pipeline's guidance, where each can be seen."""
        signature = self.signature
        steps = engine.clock.num_steps
        expected_steps = signature.get("steps")
        if expected_steps is not None and steps is not None and steps != expected_steps:
            self.mismatch("steps", expected_steps, steps)
        elif expected_steps is not None and steps is not None:
            if engine.pipeline_mode:
                sigmas = getattr(engine.scheduler, "sigmas", None)
                timesteps = getattr(engine.scheduler, "timesteps", None)
            else:
                sigmas, timesteps = engine.sigmas, None
            seen = schedule_digests(sigmas, timesteps, steps)
            for name in ("sigmas", "timesteps"):
                if signature.get(name) and seen[name] is not None and seen[name] != signature[name]:
                    self.mismatch(name, signature[name], seen[name], why=f"another noise schedule for {steps} steps")
        shape = signature.get("latent_shape")
        if shape is not None and isinstance(latent, torch.Tensor) and latent.dim() >= 1:
            seen_shape = list(latent.shape[1:])
            if seen_shape != list(shape):
                self.mismatch("latent_shape", list(shape), seen_shape, component,
                              "another resolution or number of frames")
        guidance = signature.get("guidance")
        seen_guidance = getattr(self.pipe, "_guidance_scale", None) if self.pipe is not None else None
        if guidance is not None and isinstance(seen_guidance, (int, float)) and not isinstance(seen_guidance, bool):
            if not math.isclose(float(seen_guidance), float(guidance), rel_tol=1e-6, abs_tol=1e-9):
                self.mismatch("guidance", guidance, float(seen_guidance))

    def report(self) -> list[dict]:
        return [dict(m) for m in self.mismatches]


def signature_digests_for(module: torch.nn.Module) -> dict[str, Any]:
    """What the tracer records of one component: its sampled weights digest and config hash."""
    return {"weights": weights_digest(module), "config_hash": model_identity(module)["config_hash"]}
