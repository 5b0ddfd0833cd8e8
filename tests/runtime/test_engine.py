"""The hook engine (calib.runtime.engine) on the built-in models: what stats() says about each decision, every
forecast target exact at threshold 0 and full budget and doing what it says on skipped steps, remove() restoring
everything, a forecast basis plugged in from outside, and the tracer on the engine recording what the recorder
recorded before it."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

import calib.runtime as cr
from calib.hooking import wrap_forward
from calib.runtime import decision as reasons
from calib.runtime.forecast import FORECAST_KINDS, ForecastSpec
from helpers import generation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 8
TARGETS = ("residual", "hidden", "output")
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "trace_reference.npz"


generate = functools.partial(generation.generate, mode="sequential", steps=STEPS)  # tests/helpers/generation.py


def teacache(pipe, forecast=None):
    return cr.parse(cr.document_for(pipe.transformer, forecast=forecast))


class Calls:
    """How often each named submodule's forward ran (forward hooks: they fire only when the body runs)."""

    def __init__(self, transformer, *names):
        self.counts = dict.fromkeys(names, 0)
        self.handles = [transformer.get_submodule(n).register_forward_hook(self._count(n)) for n in names]

    def _count(self, name):
        def hook(module, inputs, output):
            self.counts[name] += 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------
# decisions in stats()
# ---------------------------------------------------------------------------------------------------------------
def test_stats_tell_forced_from_gated_computes(pipe):
    """First and last step are forced; the gate's own computes are 'gated'; every decision has its reason."""
    for threshold, gated in ((0.0, STEPS - 2), (1e9, 0), (0.2, None)):
        with cr.apply(pipe, teacache(pipe), threshold=threshold) as handle:
            generate(pipe)
            stats = handle.stats()
        for traj in stats["trajectories"]:
            assert traj["forced"] == 2 and traj["forced_steps"] == [0, STEPS - 1]
            assert traj["computed"] == traj["forced"] + traj["gated"]
            assert traj["reasons"][reasons.FIRST_STEP] == traj["reasons"][reasons.LAST_STEP] == 1
            assert sum(traj["reasons"].values()) == traj["steps"] == STEPS
            if gated is not None:
                assert traj["gated"] == gated
        assert stats["computed"] == stats["forced"] + stats["gated"]
    assert 0 < traj["gated"] < STEPS - 2 and traj["skipped"] > 0  # threshold 0.2: the gate chose some, skipped some
    assert traj["reasons"][reasons.UNDER_THRESHOLD] == traj["skipped"]
    assert traj["reasons"][reasons.OVER_THRESHOLD] == traj["gated"]


def test_stats_of_a_mask_count_listed_and_forced_steps(pipe):
    """A mask that leaves step 0 out still computes it (nothing cached yet), and says so."""
    listed = [2, 5, STEPS - 1]
    with cr.apply_schedule(pipe, {"transformer": listed}, steps=STEPS) as handle:
        generate(pipe)
        stats = handle.stats()
    for traj in stats["trajectories"]:
        assert (traj["listed"], traj["forced"], traj["forced_steps"]) == (3, 1, [0])
        assert traj["reasons"] == {reasons.NOTHING_CACHED: 1, reasons.LISTED: 3, reasons.NOT_LISTED: STEPS - 4}
    assert "gated" not in stats and stats["listed"] == 6


def test_gate_decision_reasons():
    gate = cr.TeaCacheGate(cr.Rescaler([2.0, 0.0]), threshold=0.5)
    assert gate.decide(None, forced=reasons.FIRST_STEP) == cr.Decision(True, reasons.FIRST_STEP, forced=True)
    under = gate.decide(0.1)
    assert (under.compute, under.reason, under.forced, under.accumulated) == (False, reasons.UNDER_THRESHOLD, False,
                                                                              pytest.approx(0.2))
    gate.decide(0.1)
    over = gate.decide(0.1)
    assert (over.compute, over.reason, over.forced, over.accumulated) == (True, reasons.OVER_THRESHOLD, False, 0.0)
    assert gate.decide(None).reason == reasons.NO_PREVIOUS_INDICATOR and gate.decide(None).forced
    assert gate.decide(float("nan")).reason == reasons.CHANGE_NOT_FINITE
    assert gate.decide(0.1, scale=0.0).reason == reasons.NO_NOISE_CHANGE
    assert cr.TeaCacheGate(cr.Rescaler([1.0]), 0.0).decide(0.3) == cr.Decision(True, reasons.THRESHOLD_ZERO)
    with pytest.raises(dataclasses.FrozenInstanceError):
        over.compute = False


# ---------------------------------------------------------------------------------------------------------------
# forecast targets
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_every_target_is_exact_at_threshold_zero_and_full_budget(pipe, wan, target):
    for model, mode in ((pipe, "batched"), (pipe, "sequential"), (wan, "sequential")):
        base = generate(model, mode=mode)
        for forecast in (cr.Forecast(2, "sigma", target),):  # at threshold 0 no forecast is used: any order does
            with cr.apply(model, teacache(model, forecast), threshold=0.0):
                assert torch.equal(generate(model, mode=mode), base)
            with cr.apply_schedule(model, {"transformer": list(range(STEPS))}, steps=STEPS, forecast=forecast):
                assert torch.equal(generate(model, mode=mode), base)
        assert torch.equal(generate(model, mode=mode), base)  # removed


def test_targets_skip_what_they_say(pipe):
    """On a skipped step: residual and hidden run the output head (proj_out) but no block body; output runs
    neither and returns the forecast in the transformer's own return type."""
    mask = [0, 2, 4, 6, STEPS - 1]
    body = "single_transformer_blocks.3.proj_out"  # inside the last block: runs only when the block computes
    base = generate(pipe)
    for target in TARGETS:
        calls = Calls(pipe.transformer, body, "proj_out")
        returned = []
        try:
            with cr.apply_schedule(pipe, {"transformer": mask}, steps=STEPS, forecast=cr.Forecast(1, target=target)):
                undo = wrap_forward(pipe.transformer, lambda original, *a, **k: returned.append(original(*a, **k))
                                    or returned[-1])
                try:
                    out = generate(pipe)
                finally:
                    undo()
        finally:
            calls.remove()
        streams = 2
        assert calls.counts[body] == streams * len(mask)
        assert calls.counts["proj_out"] == streams * (len(mask) if target == "output" else STEPS)
        assert len({type(r) for r in returned}) == 1 and len(returned) == streams * STEPS
        assert torch.isfinite(out).all() and 0 < float((out - base).abs().mean() / base.abs().mean()) < 0.2


def test_output_target_with_a_gate_leaves_at_the_first_block(pipe):
    """A gate needs the indicator: on a skipped step only the first block's modulation layer and the embeddings
    run, then the transformer returns the forecast."""
    calls = Calls(pipe.transformer, "transformer_blocks.0.norm1", "transformer_blocks.0.attn", "proj_out")
    try:
        with cr.apply(pipe, teacache(pipe, cr.Forecast(1, target="output")), threshold=1e9) as handle:
            generate(pipe)
            stats = handle.stats()
    finally:
        calls.remove()
    assert stats["computed"] == 4 and stats["steps"] == 2 * STEPS  # first and last step per stream
    assert calls.counts == {"transformer_blocks.0.norm1": 2 * STEPS, "transformer_blocks.0.attn": 4, "proj_out": 4}


def test_forecast_memory_is_per_target(pipe):
    """stats() states what each stream holds: the stack residual and the hidden states are of the stack's width,
    the output of the latent's channels."""
    held = {}
    for target in TARGETS:
        with cr.apply_schedule(pipe, {"transformer": [0, 2, STEPS - 1]}, steps=STEPS,
                               forecast=cr.Forecast(1, target=target)) as handle:
            generate(pipe)
            report = handle.stats()["forecast"]["transformer"]
        assert report["target"] == target if target != "residual" else "target" not in report
        assert report["streams"] == 2 and report["tensors"] == 4
        held[target] = report["bytes"]
    config = pipe.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    assert held["residual"] == held["hidden"] == 4 * 2 * 16 * width * 4
    assert held["output"] == 4 * 2 * 16 * config.in_channels * 4


def test_forecast_target_in_a_file_round_trips(pipe, tmp_path):
    forecast = cr.Forecast(1, "sigma", "hidden")
    config = teacache(pipe, forecast)
    assert config.components["transformer"].forecast == forecast
    assert config.document["components"]["transformer"]["forecast"]["target"] == "hidden"
    assert cr.Forecast(1).as_json() == {"kind": "newton", "order": 1, "variable": "step"}  # residual: as before
    with pytest.raises(cr.ForecastError, match="target must be one of residual, hidden, output"):
        cr.Forecast(1, target="latent")
    doc = cr.document_for(pipe.transformer)
    doc["components"]["transformer"]["forecast"] = {"kind": "newton", "order": 1, "target": "latent"}
    with pytest.raises(cr.CoefficientFileError, match=r"components.transformer.forecast"):
        cr.parse(doc)


# ---------------------------------------------------------------------------------------------------------------
# the plug-in protocol
# ---------------------------------------------------------------------------------------------------------------
class MeanHistory:
    """The mean of the last two computed values, whatever the step: a basis the engine has never heard of."""

    def __init__(self):
        self.values = []

    def push(self, step, x, value):
        self.values = (self.values + [value])[-2:]

    def predict(self, step, x):
        return sum(self.values) / len(self.values)

    def clear(self):
        self.values = []

    def __len__(self):
        return len(self.values)

    @property
    def nbytes(self):
        return sum(v.numel() * v.element_size() for v in self.values)


@pytest.fixture
def mean_basis():
    @dataclasses.dataclass(frozen=True)
    class MeanOfTwo(ForecastSpec):
        target: str = "output"
        variable: str = "step"
        kind = "test-mean-of-two"
        tensors_per_stream = 2

        def history(self):
            return MeanHistory()

        def as_json(self):
            return {"kind": self.kind, "target": self.target}

    yield MeanOfTwo
    FORECAST_KINDS.pop(MeanOfTwo.kind)


def test_a_forecast_basis_plugs_in_without_touching_the_engine(pipe, mean_basis):
    base = generate(pipe)
    with cr.apply_schedule(pipe, {"transformer": list(range(STEPS))}, steps=STEPS, forecast=mean_basis()):
        assert torch.equal(generate(pipe), base)
    with cr.apply_schedule(pipe, {"transformer": [0, 1, 4, STEPS - 1]}, steps=STEPS, forecast=mean_basis()) as h:
        out = generate(pipe)
        report = h.stats()["forecast"]["transformer"]
    assert report["kind"] == "test-mean-of-two" and report["tensors"] == 4 and report["bytes"] > 0
    assert 0 < float((out - base).abs().mean() / base.abs().mean()) < 0.3


# ---------------------------------------------------------------------------------------------------------------
# remove() leaves the model as it was
# ---------------------------------------------------------------------------------------------------------------
def _hook_state(pipe):
    t = pipe.transformer
    modules = dict(t.named_modules())
    return (
        sorted(k for k in vars(t) if k in ("forward", "_diffusers_hook", "_calib_cache_handle")),
        {n: "forward" in vars(m) for n, m in modules.items()},
        {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in modules.items()},
        sorted(k for k in ("set_timesteps", "step") if k in vars(pipe.scheduler)),
    )


def test_remove_restores_everything_for_every_method(pipe):
    from calib.trace import Tracer

    before = _hook_state(pipe)
    base = generate(pipe)
    blocks = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(4)]
    block_doc = {
        "format": "calib.coefficients", "schema_version": 1, "method": "block-cache", "calib_version": "0",
        "created": "2026-12-02T08:00:00Z", "model": {"class": "FluxTransformer2DModel"}, "calibration": {},
        "block_cache": {"rule": "accumulate", "components": {"transformer": {
            "blocks": blocks, "steps": STEPS, "changes": [[None] * 6] + [[0.1] * 6] * (STEPS - 1)}}},
    }
    installs = [
        lambda: cr.apply(pipe, teacache(pipe), threshold=0.2),
        lambda: cr.apply(pipe, teacache(pipe, cr.Forecast(1, target="output")), threshold=0.2),
        lambda: cr.apply_schedule(pipe, {"transformer": [0, 3, STEPS - 1]}, steps=STEPS),
        lambda: cr.apply(pipe, cr.parse(block_doc), threshold=0.2),
        lambda: cr.apply(pipe.transformer, teacache(pipe), threshold=0.2, num_steps=STEPS),
        lambda: Tracer(pipe),
    ]
    for install in installs:
        handle = install()
        assert _hook_state(pipe) != before
        generate(pipe)
        handle.remove()
        assert _hook_state(pipe) == before
    assert torch.equal(generate(pipe), base)


# ---------------------------------------------------------------------------------------------------------------
# the tracer on the engine records what the recorder recorded before it
# ---------------------------------------------------------------------------------------------------------------
def _make_reference():
    spec = importlib.util.spec_from_file_location("make_trace_reference", REFERENCE.with_name("make_trace_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_trace_is_bit_identical_to_the_recorder_before_the_engine():
    """tests/data/trace_reference.npz holds traces of builtin:digits (batched and separate CFG, no CFG) and
    builtin:wan-digits recorded by the recorder before it became an observer of the hook engine. On the machine
    kind it was recorded on (torch version, CPU capability) the new traces are equal bit for bit; elsewhere the
    reductions may round differently, so to float32 precision."""
    reference = np.load(REFERENCE)
    traced = _make_reference().record()
    same_platform = list(reference["__platform__"]) == [torch.__version__, torch.backends.cpu.get_cpu_capability(),
                                                        platform.machine()]
    recorded = [k for k in reference.files if k != "__platform__"]
    # series the tracer gained after the reference (First Block Cache's lags, call_rows) are checked by
    # tests/adapters/test_families.py; every series the reference holds is still traced, and the same
    assert set(recorded) <= set(traced), sorted(set(recorded) - set(traced))
    for key in recorded:
        value, expected = traced[key], reference[key]
        if expected.dtype.kind in "US" or same_platform:
            np.testing.assert_array_equal(value, expected, err_msg=key)
        else:
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7, equal_nan=True, err_msg=key)
