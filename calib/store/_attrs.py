"""Trace attributes both the store and the shard manifests read: the recorded trace settings, how two sets of them
differ (in the words of the options that set them), and the timestamps and string attributes h5py hands back."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from calib._io import parse_json

# Denoising steps a trace, a manifest or a generation may declare (calib trace --steps takes as many).
MAX_STEPS = 10_000

# The settings a resumed trace must share with the file (attribute ``trace_settings``, written by calib trace), and
# the option that sets each. Prompts and seeds are not among them: more of those extend a trace. ``cpu_offload`` is
# recorded but not matched: it changes where the weights wait between calls, not what is computed.
RESUME_FIELDS = {
    "steps": "--steps",
    "guidance": "--guidance",
    "height": "--height",
    "width": "--width",
    "num_frames": "--num-frames",
    "negative_prompt": "--negative-prompt",
    "true_cfg_scale": "--true-cfg-scale",
    "pipeline_args": "--pipeline-arg",
    "dtype": "--dtype",
    "record_blocks": "--no-blocks",
}


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def str_attr(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def stored_settings(attrs: dict) -> dict | None:
    """The ``trace_settings`` attribute of a trace file (what ``calib trace`` generated with), or None for a file
    that has none (written by an older calib, by :class:`TraceWriter` without settings, or not valid JSON)."""
    raw = attrs.get("trace_settings")
    if raw is None:
        return None
    try:
        value = parse_json(str_attr(raw))  # calib's depth and integer limits: a file's attribute is input
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# The calibration.pipeline section of a coefficient document: how the traced pipeline was called and loaded (calib
# trace's trace_settings, less what the document lists elsewhere). calib eval regenerates with exactly these.
PIPELINE_FIELDS = ("height", "width", "num_frames", "negative_prompt", "true_cfg_scale", "pipeline_args", "dtype",
                   "cpu_offload")


def pipeline_settings(attrs_list) -> dict | None:
    """The :data:`PIPELINE_FIELDS` of trace files (their attributes, one dict per file) when every file records
    them and they agree (``cpu_offload``, which does not change what is computed, is true if any file used it);
    None for traces of an older calib, or files traced with different pipeline settings (``--allow-mixed``)."""
    found = [stored_settings(a) for a in (attrs_list or [])]
    if not found or any(s is None for s in found):
        return None
    first = found[0]
    for other in found[1:]:
        if settings_difference(first, other, unknown=("steps", "guidance", "record_blocks")) is not None:
            return None
    section = {k: first.get(k) for k in PIPELINE_FIELDS}
    section["pipeline_args"] = dict(section["pipeline_args"] or {})
    section["cpu_offload"] = any(bool(s.get("cpu_offload")) for s in found)
    return section


_ABSENT = object()  # a --pipeline-arg one side does not give


def describe_setting(name: str, value, key: str | None = None) -> str:
    """One stored setting as the option that gives it: ``--steps 30``, ``no --height (the pipeline's default)``."""
    option = RESUME_FIELDS.get(name, name)
    if name == "pipeline_args":
        if value is _ABSENT:
            return f"no --pipeline-arg {key}"
        return f"--pipeline-arg {key}={json.dumps(value, ensure_ascii=False)}"
    if name == "record_blocks":
        return "per-block changes (no --no-blocks)" if value else "--no-blocks"
    if name == "resolution":
        return f"resolution {'x'.join(str(v) for v in value) or 'unknown'}"
    if value is None:
        return f"no {option}" + (" (the pipeline's default)" if name in ("height", "width", "num_frames") else "")
    if isinstance(value, float):
        return f"{option} {value:g}"
    if isinstance(value, str) and name == "negative_prompt":
        return f"{option} {value!r}"
    return f"{option} {value}"


def settings_difference(stored: dict, now: dict, *, unknown=()) -> tuple[str, str] | None:
    """``(stored, now)`` in words for the first resume setting (:data:`RESUME_FIELDS`) on which a trace's stored
    settings and a command's differ; None when they agree. Names in ``unknown`` are not compared (the command does
    not know them yet, e.g. the dtype before the model is loaded when --dtype was not given)."""
    for name in RESUME_FIELDS:
        if name in unknown or name not in now:
            continue
        old, new = stored.get(name), now.get(name)
        if name == "pipeline_args":
            old, new = dict(old or {}), dict(new or {})
            for key in list(old) + [k for k in new if k not in old]:
                a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
                if a is _ABSENT or b is _ABSENT or json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                    return describe_setting(name, a, key), describe_setting(name, b, key)
            continue
        if name in ("guidance", "true_cfg_scale") and old is not None and new is not None:
            same = float(old) == float(new)
        elif name == "record_blocks":
            same = bool(True if old is None else old) == bool(new)
        else:
            same = old == new
        if not same:
            return describe_setting(name, old), describe_setting(name, new)
    return None
