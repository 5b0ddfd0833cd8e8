"""The parts of a coefficient document that every method shares (model, calibration, header), and the checks of
the method-specific sections that JSON Schema cannot express. TeaCache documents are built by
:func:`calib.export.build_document`; block-cache and fastercache-cfg documents by their own modules with these."""

from __future__ import annotations

import numpy as np

from . import __version__
from .errors import CalibError

SECTIONS = {"block-cache": "block_cache", "fastercache-cfg": "fastercache_cfg"}


def model_section(trace_set) -> dict:
    info = dict(getattr(trace_set, "model_info", None) or {})
    if not info.get("class"):
        raise CalibError("the traces do not record the model class; trace again with this version of calib")
    model = {"class": str(info["class"])}
    for key in ("source", "config_hash", "adapter"):
        if info.get(key) is not None:
            model[key] = str(info[key])
    return model


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
    out["trace_files"] = [str(f) for f in (getattr(trace_set, "files", None) or [])]
    return out


def header(method: str, trace_set, created: str | None = None) -> dict:
    from .export import FORMAT, SCHEMA_VERSION, _utc_now

    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "method": method,
        "calib_version": __version__,
        "created": created or _utc_now(),
        "model": model_section(trace_set),
        "calibration": calibration_section(trace_set),
    }


def check_method_section(doc: dict, source: str) -> None:
    """Code checks of a block_cache / fastercache_cfg section (called by calib.export.validate_document)."""

    def fail(where: str, what: str):
        raise CalibError(f"{source}: {where}: {what}")

    method = doc.get("method")
    if method == "block-cache":
        from .block_cache import check_section

        check_section(doc, fail)
    elif method == "fastercache-cfg":
        from .fastercache import check_section

        check_section(doc, fail)
    elif method == "schedule":  # step lists within 0..steps-1, budgets distinct, recommended among them
        from .runtime.schedule import parse

        parse(doc, source)
