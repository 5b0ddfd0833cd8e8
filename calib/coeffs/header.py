"""The parts of a coefficient document that every method shares: the header (format, version, method, created),
the model and calibration sections, the validity signature, and the ``calibration.pipeline`` settings calib eval
regenerates with."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np

from calib import __version__
from calib.errors import CalibError
from calib.runtime.document import FORMAT, SCHEMA_VERSION
from calib.runtime.signature import WEIGHTS_SAMPLE, values_digest

def model_section(trace_set) -> dict:
    info = dict(getattr(trace_set, "model_info", None) or {})
    if not info.get("class"):
        raise CalibError("the traces do not record the model class; trace again with this version of calib")
    model = {"class": str(info["class"])}
    for key in ("source", "config_hash", "adapter"):
        if info.get(key) is not None:
            model[key] = str(info[key])
    return model


def pipeline_call_kwargs(section: dict | None) -> dict:
    """The keyword arguments a ``calibration.pipeline`` section says the pipeline was called with (besides
    prompt, steps, guidance, generator and output type): its pipeline_args, then size and true-CFG arguments."""
    section = section or {}
    kwargs = dict(section.get("pipeline_args") or {})
    for name in ("height", "width", "num_frames", "negative_prompt", "true_cfg_scale"):
        if section.get(name) is not None:
            kwargs[name] = section[name]
    return kwargs


def describe_pipeline(section: dict | None) -> str:
    """``calibration.pipeline`` in one line, as the options that give it."""
    if not section:
        return "pipeline settings not recorded (traced by an older calib, or of several settings)"
    return describe_call(pipeline_call_kwargs(section), section.get("dtype"), bool(section.get("cpu_offload")))


_NAMED_OPTIONS = {"height": "--height", "width": "--width", "num_frames": "--num-frames",
                  "negative_prompt": "--negative-prompt", "true_cfg_scale": "--true-cfg-scale"}


def describe_call(kwargs: dict, dtype: str | None = None, cpu_offload: bool = False) -> str:
    """Pipeline call arguments (besides prompt, steps, guidance, generator), dtype and offload as the options of
    calib trace that give them: ``--negative-prompt 'bad' --true-cfg-scale 4 --dtype bfloat16``."""
    parts = []
    for name, option in _NAMED_OPTIONS.items():
        value = kwargs.get(name)
        if value is None:
            continue
        if name == "negative_prompt":
            parts.append(f"{option} {value!r}")
        elif isinstance(value, float):
            parts.append(f"{option} {value:g}")
        else:
            parts.append(f"{option} {value}")
    for key, value in kwargs.items():
        if key not in _NAMED_OPTIONS:
            parts.append(f"--pipeline-arg {key}={json.dumps(value, ensure_ascii=False)}")
    if dtype:
        parts.append(f"--dtype {dtype}")
    if cpu_offload:
        parts.append("--cpu-offload")
    return " ".join(parts) if parts else "the pipeline's defaults"


def cfg_layout(trajectories) -> str | None:
    """How the traced pipeline gave classifier-free guidance to its transformer: ``"separate"`` (one call per branch:
    Wan, true-CFG FLUX / Qwen-Image), ``"batched"`` (one call on [uncond, cond] rows), ``"none"`` (no uncond
    stream); None when the traces do not say (written before calib recorded ``call_rows``) or mix layouts. Caches
    that count calls as steps or split a batch need it (calib.exports)."""
    trajectories = list(trajectories)
    branches = [t for t in trajectories if t.stream in ("cond", "uncond")]
    if not any(t.stream == "uncond" for t in branches):
        return "none" if trajectories else None
    rows = set()
    for t in branches:
        values = (getattr(t, "extra", None) or {}).get("call_rows")
        if values is None or not np.isfinite(values).any():
            return None
        rows.add(int(np.nanmax(values)))
    return "separate" if rows == {1} else "batched" if min(rows) > 1 else None


def calibration_section(trace_set) -> dict:
    info = dict(getattr(trace_set, "model_info", None) or {})
    settings = trace_set.settings()
    out = {"steps": [int(s) for s in settings.get("steps", [])]}
    if info.get("scheduler") is not None:
        out["scheduler"] = str(info["scheduler"])
    out["guidance"] = [None if g is None else float(g) for g in settings.get("guidance", [])]
    # A trace of a pipeline that does not say its resolution (no --height/--width) records an empty one: not listed.
    out["resolution"] = [[int(v) for v in np.atleast_1d(r)] for r in settings.get("resolution", []) if np.size(r)]
    out["num_prompts"] = int(settings.get("prompts", 0))
    out["num_seeds"] = int(settings.get("seeds", 0))
    out["num_trajectories"] = len(trace_set.trajectories)
    out["streams"] = [str(s) for s in settings.get("streams", [])]
    layout = cfg_layout(trace_set.trajectories)
    if layout is not None:
        out["cfg"] = layout
    out["trace_files"] = [str(f) for f in (getattr(trace_set, "files", None) or [])]
    # calibration.pipeline: how calib eval regenerates; a trace set built in memory may not record it
    pipeline = trace_set.pipeline_settings() if hasattr(trace_set, "pipeline_settings") else None
    if pipeline is not None:
        out["pipeline"] = pipeline
    return out


def _file_infos(trace_set) -> list[dict]:
    """The ``model_info`` each trace file records (its attributes), for what must agree across files."""
    infos = []
    for attrs in getattr(trace_set, "attrs", None) or []:
        raw = (attrs or {}).get("model_info")
        if raw is None:
            continue
        try:
            value = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
        except (TypeError, ValueError):
            continue
        if isinstance(value, dict):
            infos.append(value)
    return infos


def _step_values(trajectories, steps: int, name: str) -> list[float] | None:
    """The value of series ``name`` (``timesteps``, ``sigmas``) at each step ``0..steps-1``, where the trajectories
    (of every component) cover every step and agree on it; None otherwise."""
    # a trace set built in memory may hold trajectories without the series: then no digest, not an error
    ours = [t for t in trajectories if getattr(t, "steps", None) == steps and getattr(t, "step_index", None) is not None
            and getattr(t, name, None) is not None]
    index = [np.asarray(t.step_index) for t in ours]
    values = [np.asarray(getattr(t, name), dtype=np.float64) for t in ours]
    if not index:
        return None
    index, values = np.concatenate(index), np.concatenate(values)
    keep = index < steps
    index, values = index[keep], values[keep]
    if not np.isfinite(values).all():
        return None
    table = np.full(steps, np.nan)
    table[index] = values
    if not np.isfinite(table).all() or not np.array_equal(table[index], values):
        return None
    return [float(v) for v in table]


def signature_section(trace_set) -> dict | None:
    """The document's validity signature (docs/coefficient-format.md#signature): what the traces were measured on,
    for the runtime to compare with what it is applied to (:mod:`calib.runtime.signature`). Each field only where the
    traces say it alike for all of them; None when they say nothing (traces of an older calib, built in memory)."""
    info = dict(getattr(trace_set, "model_info", None) or {})
    infos = _file_infos(trace_set) or [info]
    out: dict = {}

    def agreed(key):
        values = [i.get(key) for i in infos]
        return values[0] if all(v == values[0] for v in values) else None

    weights = agreed("weights_digest")
    if isinstance(weights, dict) and weights and all(isinstance(v, str) for v in weights.values()):
        out["weights"] = {str(k): v for k, v in weights.items()}
        out["weights_sample"] = str(info.get("weights_sample") or WEIGHTS_SAMPLE)
    hashes = agreed("config_hashes")
    if isinstance(hashes, dict) and hashes and all(isinstance(v, str) for v in hashes.values()):
        out["config_hash"] = {str(k): v for k, v in hashes.items()}
    pipeline = trace_set.pipeline_settings() if hasattr(trace_set, "pipeline_settings") else None
    if pipeline and pipeline.get("dtype"):
        out["dtype"] = str(pipeline["dtype"])
    if agreed("scheduler"):
        scheduler = {"class": str(info["scheduler"])}
        if isinstance(agreed("scheduler_config_hash"), str):
            scheduler["config_hash"] = info["scheduler_config_hash"]
        out["scheduler"] = scheduler
    settings = trace_set.settings()
    trajectories = list(getattr(trace_set, "trajectories", None) or [])
    if len(settings.get("steps", [])) == 1:
        steps = int(settings["steps"][0])
        out["steps"] = steps
        for name in ("sigmas", "timesteps"):
            digest = values_digest(_step_values(trajectories, steps, name))
            if digest is not None:
                out[name] = digest
    shapes = {tuple(getattr(t, "latent_shape", ()) or ()) for t in trajectories}
    if len(shapes) == 1 and next(iter(shapes)):
        out["latent_shape"] = [int(v) for v in next(iter(shapes))]
    resolutions = [r for r in settings.get("resolution", []) if np.size(r)]
    if len(settings.get("resolution", [])) == 1 and resolutions:
        out["resolution"] = [int(v) for v in np.atleast_1d(resolutions[0])]
    if len(settings.get("guidance", [])) == 1 and settings["guidance"][0] is not None:
        out["guidance"] = float(settings["guidance"][0])
    if pipeline is not None:
        out["call"] = pipeline_call_kwargs(pipeline)
    return out or None


def with_signature(doc: dict, trace_set) -> dict:
    """``doc`` with its ``signature`` (placed after ``calibration``) when the traces give one."""
    signature = signature_section(trace_set)
    if signature is None:
        return doc
    out = {}
    for key, value in doc.items():
        out[key] = value
        if key == "calibration":
            out["signature"] = signature
    out.setdefault("signature", signature)
    return out


def utc_now() -> str:
    """The document's ``created`` time: now, in UTC, to the second (RFC 3339)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def header(method: str, trace_set, created: str | None = None) -> dict:
    """The fields every method's document starts with: format, version, method, calib version, created, model,
    calibration, and the validity signature when the traces give one."""
    return with_signature({
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "method": method,
        "calib_version": __version__,
        "created": created or utc_now(),
        "model": model_section(trace_set),
        "calibration": calibration_section(trace_set),
    }, trace_set)
