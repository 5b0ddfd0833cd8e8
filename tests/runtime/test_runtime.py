"""The runtime on the built-in digits model: exact parity at threshold 0, the paper's first/last rule, streams,
model identity checks, removal, and bad thresholds."""

import dataclasses
import functools
import json
import warnings

import pytest
import torch

import calib.runtime as cr
from calib.adapters import get_adapter
from calib.errors import CalibError
from calib.runtime.gate import Rescaler, TeaCacheGate, replay
from helpers import generation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 12


def make_config(pipe, coefficients=(1.0, 0.0), domain=None, model_class=None, config_hash=None, recommended=None):
    doc = cr.document_for(pipe.transformer, coefficients, domain=domain, recommended=recommended)
    doc["model"]["class"] = model_class or doc["model"]["class"]
    doc["model"]["config_hash"] = config_hash or doc["model"]["config_hash"]
    return cr.parse(doc)


generate = functools.partial(generation.generate, steps=STEPS)  # tests/helpers/generation.py


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


# ---------------------------------------------------------------------------------------------------------------
# apply()'s arguments: each method takes its own, each checked before any hook is installed
# ---------------------------------------------------------------------------------------------------------------
def block_cache_config(pipe):
    blocks = [n for n, _ in get_adapter(pipe.transformer).blocks(pipe.transformer)]
    return cr.parse({
        "format": "calib.coefficients", "schema_version": 1, "method": "block-cache", "calib_version": "0",
        "created": "2026-12-02T08:00:00Z", "model": {"class": "FluxTransformer2DModel"}, "calibration": {},
        "block_cache": {"rule": "accumulate", "components": {"transformer": {
            "blocks": blocks, "steps": STEPS, "changes": [[None] * len(blocks)] + [[0.1] * len(blocks)] * (STEPS - 1)}}},
        "thresholds": {"recommended": 0.1},
    })


def no_hooks_left(pipe):
    return "forward" not in vars(pipe.transformer) and not hasattr(pipe.transformer, "_calib_cache_handle") and not {
        "set_timesteps", "step"} & set(vars(pipe.scheduler))


BAD_OPTIONS = [
    ("teacache", {"num_steps": "4"}, cr.OptionError, "num_steps must be an integer >= 1, got '4'"),
    ("teacache", {"num_steps": 0}, cr.OptionValueError, "num_steps must be an integer >= 1, got 0"),
    ("teacache", {"num_steps": True}, cr.OptionError, "num_steps must be an integer"),
    ("teacache", {"sigmas": "abc"}, cr.OptionError, "sigmas must be the scheduler's noise levels"),
    ("teacache", {"sigmas": ["a"]}, cr.OptionError, "sigmas must be numbers, got 'a'"),
    ("teacache", {"sigmas": [1.0, float("nan")]}, cr.OptionValueError, "sigmas must be finite numbers, got nan"),
    ("teacache", {"sigmas": []}, cr.OptionValueError, "sigmas is empty"),
    ("teacache", {"forecast": {"order": 1}}, cr.OptionError, "forecast must be a calib.runtime.Forecast"),
    ("teacache", {"forecast": 1}, cr.OptionError, "forecast must be a calib.runtime.Forecast"),
    ("teacache", {"threshold": float("nan")}, cr.ThresholdError, "threshold must be a finite number, got nan"),
    ("teacache", {"threshold": -0.5}, cr.ThresholdError, "threshold must be >= 0, got -0.5"),
    ("teacache", {"threshold": True}, cr.ThresholdError, "threshold must be a number, got True"),
    ("teacache", {"allow_model_mismatch": "yes"}, cr.OptionError, "allow_model_mismatch must be True or False"),
    ("teacache", {"modulation_module": 3}, cr.OptionError, "modulation_module must be a dotted module path"),
    ("teacache", {"budget": 4}, cr.OptionError, "a teacache config does not take budget=; it takes"),
    ("teacache", {"treshold": 0.1}, cr.OptionError, "does not take treshold="),
    ("schedule", {"budget": "3"}, cr.OptionError, "budget must be a number of full forwards (e.g. 15 or 7.5), got '3'"),
    ("schedule", {"budget": 3.25}, cr.OptionValueError, "budget must be a positive multiple of 0.5 full forwards"),
    ("schedule", {"budget": 5}, cr.ScheduleError, "has no schedule for budget 5; it has budgets 3"),
    ("schedule", {"threshold": 0.1}, cr.OptionError, "a schedule config does not take threshold="),
    ("schedule", {"num_steps": STEPS + 1}, cr.StepCountError, f"searched for {STEPS} steps, not num_steps"),
    ("block-cache", {"forecast": cr.Forecast(1)}, cr.OptionError,
     "a block-cache config does not take forecast=; it takes num_steps=, allow_model_mismatch=, modulation_module=, "
     "strict=, threshold="),
    ("block-cache", {"budget": 3, "sigmas": [1.0, 0.0]}, cr.OptionError, "does not take budget=, sigmas="),
    ("block-cache", {"threshold": "fast"}, cr.ThresholdError, "threshold must be a number, got 'fast'"),
]


@pytest.mark.parametrize("method,options,error,message", BAD_OPTIONS,
                         ids=[f"{m}-{'-'.join(o)}-{i}" for i, (m, o, _, _) in enumerate(BAD_OPTIONS)])
def test_apply_refuses_bad_options_in_one_line_before_hooking(pipe, method, options, error, message):
    config = {"teacache": lambda: make_config(pipe, recommended=0.1), "block-cache": lambda: block_cache_config(pipe),
              "schedule": lambda: cr.parse(cr.schedule_document_for(pipe, steps=STEPS,
                                                                    schedules={3: {"transformer": [0, 5, 11]}}))}[method]()
    with pytest.raises(error) as info:
        cr.apply(pipe, config, **options)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, CalibError)
    if error in (cr.OptionError, cr.OptionValueError):  # a wrong keyword or type is a TypeError, a range a ValueError
        assert isinstance(info.value, TypeError)
        assert isinstance(info.value, ValueError) == (error is cr.OptionValueError)
    assert no_hooks_left(pipe)


def test_an_option_given_as_none_is_not_given(pipe):
    """Code that passes every keyword through (None when unset) works for every method."""
    for config in (make_config(pipe, recommended=0.1), block_cache_config(pipe)):
        cr.apply(pipe, config, forecast=None, budget=None, sigmas=None).remove()
    assert no_hooks_left(pipe)


def test_apply_takes_only_configs(pipe):
    with pytest.raises(cr.OptionError, match="apply\\(\\) takes a config from calib.runtime.load or parse"):
        cr.apply(pipe, make_config(pipe).document)


def test_every_method_gets_one_handle_class(pipe):
    handles = [cr.apply(pipe, make_config(pipe), threshold=0.1)]
    handles[-1].remove()
    handles.append(cr.apply(pipe, block_cache_config(pipe)))
    handles[-1].remove()
    handles.append(cr.apply_schedule(pipe, {"transformer": [0, STEPS - 1]}, steps=STEPS))
    handles[-1].remove()
    assert all(type(h) is cr.CacheHandle for h in handles)
    assert [(h.method, h.threshold, h.budget) for h in handles] == [
        ("teacache", 0.1, None), ("block-cache", 0.1, None), ("schedule", None, 2)]
    assert set(cr.RUNTIME_METHODS) == {"teacache", "schedule", "block-cache"}
    for method in cr.RUNTIME_METHODS.values():  # a config always knows its method
        assert method.config.method == method.name


def test_apply_schedule_checks_its_mask(pipe):
    for mask, message in (({"transformer": [0, STEPS]}, f"step {STEPS} is outside 0..{STEPS - 1}"),
                          ({"transformer": [0, 0]}, "lists a step twice"), ({}, "the schedule must be")):
        with pytest.raises(CalibError, match=message):
            cr.apply_schedule(pipe, mask, steps=STEPS)
    with pytest.raises(cr.OptionError, match="steps must be an integer"):
        cr.apply_schedule(pipe, {"transformer": [0]}, steps="12")
    assert no_hooks_left(pipe)


def test_load_records_the_path_and_parse_does_not(pipe, tmp_path):
    doc = make_config(pipe).document
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    loaded = cr.load(path)
    assert isinstance(loaded, cr.TeaCacheConfig) and loaded.path == str(path)
    assert cr.parse(doc).path is None and loaded == dataclasses.replace(cr.parse(doc, str(path)), path=str(path))
