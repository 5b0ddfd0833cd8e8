"""The runtime on the built-in digits model: exact parity at threshold 0, the paper's first/last rule, streams,
model identity checks, removal, and bad thresholds."""

import json
import warnings

import pytest
import torch

import calib.runtime as cr
from calib.models import digits
from calib.runtime.gate import Rescaler, TeaCacheGate, replay

STEPS = 12


@pytest.fixture(scope="module")
def pipe():
    return digits.load_pipeline()


def make_config(pipe, coefficients=(1.0, 0.0), domain=None, model_class=None, config_hash=None, recommended=None):
    doc = cr.document_for(pipe.transformer, coefficients, domain=domain, recommended=recommended)
    doc["model"]["class"] = model_class or doc["model"]["class"]
    doc["model"]["config_hash"] = config_hash or doc["model"]["config_hash"]
    return cr.parse(doc)


def generate(pipe, mode="batched", prompts=("a handwritten 3", "7"), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = pipe(list(prompts), num_inference_steps=STEPS, guidance_scale=3.0, generator=g, output_type="latent",
               cfg_mode=mode)
    return torch.stack(out.images)


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_threshold_zero_reproduces_uncached_output_exactly(pipe, mode):
    base = generate(pipe, mode)
    with cr.apply(pipe, make_config(pipe), threshold=0.0) as handle:
        cached = generate(pipe, mode)
        stats = handle.stats()
    assert torch.equal(base, cached)
    assert stats["skipped"] == 0 and stats["computed"] == stats["steps"] > 0


@pytest.mark.parametrize("mode,streams", [("batched", {"call0"}), ("sequential", {"cond", "uncond"})])
def test_huge_threshold_computes_only_first_and_last_step_per_stream(pipe, mode, streams):
    with cr.apply(pipe, make_config(pipe), threshold=1e9) as handle:
        generate(pipe, mode)
        stats = handle.stats()
    assert {t["stream"] for t in stats["trajectories"]} == streams
    for traj in stats["trajectories"]:
        assert traj["steps"] == STEPS
        assert traj["computed"] == 2
        assert traj["skipped_steps"] == list(range(1, STEPS - 1))


def test_skipping_changes_output_a_little_and_remove_restores(pipe):
    base = generate(pipe)
    handle = cr.apply(pipe, make_config(pipe), threshold=0.2)
    cached = generate(pipe)
    stats = handle.stats()
    handle.remove()
    assert 0 < stats["skipped"] < stats["steps"]
    err = float((cached - base).abs().mean() / base.abs().mean())
    assert 0 < err < 0.2
    assert torch.equal(generate(pipe), base)
    assert "forward" not in vars(pipe.transformer)
    assert all("forward" not in vars(b) for b in pipe.transformer.transformer_blocks)


def test_state_resets_between_generations(pipe):
    with cr.apply(pipe, make_config(pipe), threshold=0.2) as handle:
        first = generate(pipe)
        second = generate(pipe)
        stats = handle.stats()
    assert torch.equal(first, second)
    gens = {t["generation"] for t in stats["trajectories"]}
    assert len(gens) == 2
    a, b = stats["trajectories"]
    assert a["skipped_steps"] == b["skipped_steps"]


def test_bare_transformer_with_num_steps(pipe):
    """Applied to the transformer alone, the timestep marks steps and num_steps the last one."""
    base = generate(pipe)
    with cr.apply(pipe.transformer, make_config(pipe), threshold=1e9, num_steps=STEPS) as handle:
        generate(pipe)
        stats = handle.stats()
    (traj,) = stats["trajectories"]
    assert traj["computed"] == 2 and traj["steps"] == STEPS
    with cr.apply(pipe.transformer, make_config(pipe), threshold=0.0, num_steps=STEPS):
        assert torch.equal(generate(pipe), base)


def test_bare_transformer_without_num_steps_warns(pipe):
    with pytest.warns(UserWarning, match="num_steps"):
        handle = cr.apply(pipe.transformer, make_config(pipe), threshold=0.1)
    handle.remove()


def test_other_model_class_is_refused_unless_allowed(pipe):
    config = make_config(pipe, model_class="WanTransformer3DModel")
    with pytest.raises(cr.ModelMismatchError, match="WanTransformer3DModel, not FluxTransformer2DModel"):
        cr.apply(pipe, config, threshold=0.1)
    assert "forward" not in vars(pipe.transformer)  # nothing left attached
    with pytest.warns(UserWarning, match="calibrated for WanTransformer3DModel"):
        cr.apply(pipe, config, threshold=0.1, allow_model_mismatch=True).remove()


def test_other_config_hash_warns(pipe):
    with pytest.warns(UserWarning, match="config differs"):
        cr.apply(pipe, make_config(pipe, config_hash="sha256:" + "0" * 64), threshold=0.1).remove()


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "abc", None])
def test_bad_thresholds(pipe, bad):
    with pytest.raises(cr.ThresholdError):
        cr.apply(pipe, make_config(pipe), threshold=bad)


def test_recommended_threshold_is_the_default(pipe):
    handle = cr.apply(pipe, make_config(pipe, recommended=0.25))
    assert handle.threshold == 0.25
    handle.remove()


def test_applying_twice_is_refused(pipe):
    handle = cr.apply(pipe, make_config(pipe), threshold=0.1)
    try:
        with pytest.raises(cr.ModelMismatchError, match="already has a calib cache"):
            cr.apply(pipe, make_config(pipe), threshold=0.1)
    finally:
        handle.remove()


def test_gate_rule():
    gate = TeaCacheGate(Rescaler([2.0, 0.0]), threshold=0.5)
    assert gate.should_compute(None) is True  # no previous step
    assert gate.should_compute(0.1) is False  # 0.2
    assert gate.should_compute(0.1) is False  # 0.4
    assert gate.should_compute(0.1) is True  # 0.6 >= 0.5: compute, reset
    assert gate.accumulated == 0.0
    assert replay([float("nan"), 0.1, 0.1, 0.1, 0.1], Rescaler([2.0, 0.0]), 0.5) == [True, False, False, True, True]


def test_rescaler_clamps_to_domain_and_never_goes_negative():
    r = Rescaler([1.0, -1.0], domain=(0.2, 0.8))  # x - 1: negative on the whole domain
    assert r(0.5) == 0.0
    r = Rescaler([1.0, 0.0], domain=(0.2, 0.8))
    assert r(5.0) == 0.8 and r(0.0) == 0.2


def test_load_errors(tmp_path, pipe):
    good = make_config(pipe).document
    cases = {
        "missing.json": None,
        "notjson.json": "{nope",
        "nan.json": json.dumps(good).replace('"coefficients": [1.0, 0.0]', '"coefficients": [NaN, 0.0]'),
        "v2.json": json.dumps({**good, "schema_version": 2}),
        "nomodel.json": json.dumps({k: v for k, v in good.items() if k != "model"}),
    }
    messages = {}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(cr.CoefficientFileError) as info:
            cr.load(path)
        messages[name] = str(info.value)
        assert "\n" not in messages[name] and str(path) in messages[name]
    assert "no such file" in messages["missing.json"]
    assert "not valid JSON" in messages["notjson.json"]
    assert "NaN" in messages["nan.json"]
    assert "version 2" in messages["v2.json"]
    assert "model" in messages["nomodel.json"]


def test_runtime_imports_only_torch_and_stdlib():
    import subprocess
    import sys

    code = (
        "import sys; import calib.runtime; "
        "bad = [m for m in ('diffusers', 'numpy.polynomial', 'sklearn', 'scipy', 'h5py', 'matplotlib', 'jsonschema') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
