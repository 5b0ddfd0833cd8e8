"""Model identity: class name and a hash of the config, so a coefficient file can be matched to its model."""

from __future__ import annotations

import hashlib
import json

import torch


def config_dict(transformer: torch.nn.Module) -> dict:
    config = getattr(transformer, "config", None) or {}
    # Private keys (_name_or_path, _diffusers_version, ...) say where a model came from, not what it is.
    return {k: v for k, v in dict(config).items() if not str(k).startswith("_")}


def config_hash(transformer: torch.nn.Module) -> str:
    blob = json.dumps(config_dict(transformer), sort_keys=True, default=str, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def model_identity(transformer: torch.nn.Module) -> dict:
    """The class name and config hash; a ``torch.compile`` wrapper (``OptimizedModule``) is the model it compiles."""
    inner = getattr(transformer, "_orig_mod", None)
    if type(transformer).__name__ == "OptimizedModule" and isinstance(inner, torch.nn.Module):
        transformer = inner
    return {"class": type(transformer).__name__, "config_hash": config_hash(transformer)}
