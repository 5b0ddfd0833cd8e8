"""Shared fixtures. Nothing in the tests may touch the network: the hub is offline for the whole session."""

from __future__ import annotations

import os

# huggingface_hub reads this when it is first imported, so set it before any test module imports diffusers
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def real_pipeline_folder(tmp_path_factory):
    """``real_pipeline_folder("flux")`` -> a folder holding the real diffusers pipeline of that family, built from
    tiny random configs by ``tests/real_pipelines.py`` and saved with ``save_pretrained``, once per session."""
    import real_pipelines

    built: dict = {}

    def folder(name: str):
        if name not in built:
            built[name] = real_pipelines.save(name, tmp_path_factory.mktemp("real-pipelines") / name)
        return built[name]

    return folder
