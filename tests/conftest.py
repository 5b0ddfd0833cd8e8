"""Shared fixtures: the built-in pipelines (``pipe``, ``wan``), ``one_thread``, the real pipeline folders. Generations
to compare go through ``helpers.generation.generate`` (built on calib.trace.generate.Generator). Nothing in the tests
may touch the network: the hub is offline for the whole session."""

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``), restored after: the
    built-in models and the tiny random transformers are small enough that more threads only spin, and on a shared
    2-core machine several threads per process oversubscribe the cores and slow every generation down many times."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    """The built-in digits pipeline (builtin:digits), loaded once per module. A test that applies a cache to it
    removes the cache before it ends (the runtime's handles are context managers)."""
    from calib.models import digits

    return digits.load_pipeline()


@pytest.fixture(scope="module")
def wan():
    """The built-in video pipeline (builtin:wan-digits), loaded once per module."""
    from calib.models import wan_digits

    return wan_digits.load_pipeline()
