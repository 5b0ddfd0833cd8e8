"""The clock of calib's measured generations (calib.trace.generate): it finishes the device's queued work before
starting and before stopping, and every generation the Generator runs is timed by it on the pipeline's device."""

from __future__ import annotations

import types

import torch

import calib.trace.generate as generate
from calib.trace.generate import Generator, pipeline_device, synchronize, timed


def test_synchronize_waits_on_the_device_named_and_not_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))  # takes no device
    synchronize("cuda:1")
    synchronize(torch.device("mps"))
    synchronize("cpu")
    assert calls == [("cuda", torch.device("cuda:1")), ("mps", None)]


def test_synchronize_without_a_device_uses_the_current_accelerator(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    synchronize()
    assert calls == []
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda", 0))
    synchronize()
    assert calls == [torch.device("cuda", 0)]


def test_timed_synchronises_before_starting_and_before_stopping_the_clock(monkeypatch):
    events = []
    monkeypatch.setattr(generate, "synchronize", lambda device=None: events.append(("sync", device)))
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(generate.time, "perf_counter", lambda: next(clock))
    with timed("cuda:0") as took:
        events.append("work")
    assert events == [("sync", "cuda:0"), "work", ("sync", "cuda:0")]
    assert took.seconds == 2.5


def test_pipeline_device_prefers_the_execution_device():
    offloaded = types.SimpleNamespace(_execution_device=torch.device("cuda", 0), device=torch.device("cpu"))
    assert pipeline_device(offloaded) == torch.device("cuda", 0)
    assert pipeline_device(types.SimpleNamespace(device=torch.device("cpu"))) == torch.device("cpu")
    assert pipeline_device(object()) is None


def test_generator_times_each_generation_on_the_pipelines_device(monkeypatch):
    from calib.models.digits import load_pipeline

    pipe = load_pipeline()
    synced = []
    monkeypatch.setattr(generate, "synchronize", lambda device=None: synced.append(device))
    gen = Generator(pipe, steps=2, guidance=1.0, output_type="latent")
    try:
        out = gen("a handwritten 7", 0)
    finally:
        gen.close()
    assert synced == [pipeline_device(pipe)] * 2
    assert out.seconds > 0 and out.latents.ndim >= 2
