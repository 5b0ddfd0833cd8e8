"""Forecasting on skipped steps and static schedules, through the runtime as a user runs them, on the built-in models:
exactness at threshold 0 / full budget with every order, the forecast's error against reuse at the same computed
steps, the memory it reports, schedule files (load, budgets, step count) and their one-line errors."""

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch

import calib.runtime as cr
from calib.errors import CalibError
from calib.methods.registry import validate as validate_document
from helpers import generation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 12
EVERY_OTHER = [0, 2, 4, 6, 8, 10, 11]


generate = functools.partial(generation.generate, steps=STEPS)  # tests/helpers/generation.py


def rel_l1(a, b):
    return float((a - b).abs().mean() / b.abs().mean())


# ---------------------------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [0, 1, 2])
def test_newton_history_is_exact_on_polynomials_of_its_order_at_uneven_points(order):
    xs = [0.0, 1.0, 3.0, 4.0, 7.0]  # uneven spacing, as a schedule or σ gives
    coefs = torch.randn(order + 1, 3, 5, dtype=torch.float64)
    value = lambda x: sum(c * x ** j for j, c in enumerate(coefs))  # noqa: E731
    history = cr.Forecast(order).history()
    for i, x in enumerate(xs):
        history.push(i, x, value(x))
        assert len(history) == min(i + 1, order + 1)  # never more than k + 1 tensors
        if i >= order:
            for target in (x + 0.5, x + 2.0):
                assert torch.allclose(history.predict(i + 1, target), value(target), rtol=1e-9, atol=1e-9)
    assert history.nbytes == (order + 1) * 15 * 8


def test_history_extrapolates_with_the_points_it_has_and_restarts_on_another_shape():
    history = cr.Forecast(2).history()
    history.push(0, 0, torch.tensor([1.0]))
    assert torch.equal(history.predict(5, 5), torch.tensor([1.0]))  # one point: reuse
    history.push(1, 1, torch.tensor([2.0]))
    assert torch.allclose(history.predict(3, 3), torch.tensor([4.0]))  # two points: linear
    history.push(2, 2, torch.zeros(2))
    assert len(history) == 1 and history.matches((2,))


def test_order_zero_returns_the_cached_tensor_itself():
    history = cr.Forecast(0).history()
    value = torch.randn(4)
    history.push(3, 3, value)
    held = history.predict(9, 9)
    assert held.data_ptr() == value.data_ptr() and torch.equal(held, value)  # no copy, no arithmetic


@pytest.mark.parametrize("kwargs", [{"order": 3}, {"order": -1}, {"order": 1.0}, {"order": True},
                                    {"variable": "time"}])
def test_bad_forecast_is_one_calib_error(kwargs):
    with pytest.raises(CalibError) as info:
        cr.Forecast(**kwargs)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# TeaCache with a forecast
# ---------------------------------------------------------------------------------------------------------------
def coefficient_file(tmp_path, pipe, forecast=None, name="coeffs.json"):
    doc = cr.document_for(pipe.transformer, forecast=forecast, recommended=0.2)
    path = tmp_path / name
    path.write_text(json.dumps(validate_document(doc)))
    return path


@pytest.fixture(scope="module")
def sequential_base(pipe):
    return generate(pipe, "sequential")


def test_threshold_zero_is_bit_exact_with_every_forecast(tmp_path, pipe, sequential_base):
    for order, variable in ((0, "step"), (1, "sigma"), (2, "step"), (2, "timestep")):
        config = cr.load(coefficient_file(tmp_path, pipe, cr.Forecast(order, variable)))
        with cr.apply(pipe, config, threshold=0.0) as handle:
            cached = generate(pipe, "sequential")
            stats = handle.stats()
        assert torch.equal(sequential_base, cached)
        assert stats["skipped"] == 0
        report = stats["forecast"]["transformer"]
        assert (report["order"], report["variable"], report["tensors_per_stream"]) == (order, variable, order + 1)
        # Two streams (cond, uncond), each holding k + 1 residuals of the stack's hidden states (2 x 16 tokens f32).
        assert report["streams"] == 2 and report["tensors"] == 2 * (order + 1)
        width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
        assert report["bytes"] == 2 * (order + 1) * (2 * 16 * width * 4) == stats["forecast_bytes"]


def test_file_without_forecast_behaves_as_order_zero(tmp_path, pipe):
    plain = cr.load(coefficient_file(tmp_path, pipe))
    assert "forecast" not in plain.document["components"]["transformer"]
    explicit = cr.load(coefficient_file(tmp_path, pipe, cr.Forecast(0), "explicit.json"))
    with cr.apply(pipe, plain) as handle:
        a = generate(pipe)
        stats_a = handle.stats()
    with cr.apply(pipe, explicit) as handle:
        b = generate(pipe)
        stats_b = handle.stats()
    assert 0 < stats_a["skipped"] and torch.equal(a, b)
    assert stats_a["trajectories"] == stats_b["trajectories"]
    assert stats_a["forecast"]["transformer"]["order"] == 0


def test_file_forecast_is_applied_and_apply_overrides_it(tmp_path, pipe):
    config = cr.load(coefficient_file(tmp_path, pipe, cr.Forecast(2)))
    assert config.components["transformer"].forecast == cr.Forecast(2, "step")
    with cr.apply(pipe, config) as handle:
        generate(pipe)
        assert handle.stats()["forecast"]["transformer"]["order"] == 2
    with cr.apply(pipe, config, forecast=cr.Forecast(1, "timestep")) as handle:
        generate(pipe)
        report = handle.stats()["forecast"]["transformer"]
    assert (report["order"], report["variable"]) == (1, "timestep")


@pytest.mark.parametrize("entry,message", [
    ({"kind": "newton", "order": 3}, "forecast order must be one of 0, 1, 2"),
    ({"kind": "taylor", "order": 1}, "is not a forecast this runtime computes"),
    ({"kind": "newton", "order": 1, "variable": "time"}, "variable"),
])
def test_bad_forecast_entry_in_a_file_is_one_line(tmp_path, pipe, entry, message):
    doc = cr.document_for(pipe.transformer)
    doc["components"]["transformer"]["forecast"] = entry
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(cr.CoefficientFileError) as info:
        cr.load(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# static schedules
# ---------------------------------------------------------------------------------------------------------------
def run_schedule(pipe, mask, forecast, seed=0, mode="batched"):
    with cr.apply_schedule(pipe, {"transformer": mask}, steps=STEPS, forecast=forecast) as handle:
        out = generate(pipe, mode, seed)
        return out, handle.stats()


def test_forecast_lowers_latent_error_against_reuse_at_the_same_computed_steps(pipe):
    # Measured on builtin:digits, 12 steps, 7 of 12 computed, seeds 0-4: order 0 0.019-0.023, order 1 0.013-0.017,
    # order 2 0.008-0.017 (wan-digits: 0.030-0.039, 0.017-0.025, 0.018-0.026). Only the direction is asserted.
    for seed in (0, 1):
        base = generate(pipe, seed=seed)
        errors = {}
        for order in (0, 1, 2):
            out, stats = run_schedule(pipe, EVERY_OTHER, cr.Forecast(order), seed)
            assert stats["computed"] == len(EVERY_OTHER)
            errors[order] = rel_l1(out, base)
        assert errors[1] < errors[0] and errors[2] < errors[0], (seed, errors)


def test_schedule_full_budget_is_exact_and_streams_follow_the_mask(pipe, sequential_base):
    base = sequential_base
    out, stats = run_schedule(pipe, list(range(STEPS)), cr.Forecast(2), mode="sequential")
    assert torch.equal(out, base) and stats["skipped"] == 0
    _, stats = run_schedule(pipe, EVERY_OTHER, cr.Forecast(1), mode="sequential")
    assert {t["stream"] for t in stats["trajectories"]} == {"cond", "uncond"}
    skipped = sorted(set(range(STEPS)) - set(EVERY_OTHER))
    assert all(t["skipped_steps"] == skipped for t in stats["trajectories"])
    assert stats["budget"] == len(EVERY_OTHER)


def schedule_file(tmp_path, pipe, **kwargs):
    doc = cr.schedule_document_for(
        pipe, steps=STEPS, forecast=cr.Forecast(1),
        schedules={len(EVERY_OTHER): {"transformer": EVERY_OTHER}, STEPS: {"transformer": list(range(STEPS))},
                   4: {"transformer": [0, 4, 8, 11]}},
        recommended=len(EVERY_OTHER), search="min_sum", **kwargs)
    path = tmp_path / "digits.schedule.json"
    path.write_text(json.dumps(validate_document(doc)))
    return path


def test_schedule_file_loads_and_applies_its_budgets(tmp_path, pipe):
    config = cr.load(schedule_file(tmp_path, pipe))
    assert isinstance(config, cr.ScheduleConfig)
    assert (config.steps, config.budgets, config.recommended_budget) == (STEPS, [4, 7, STEPS], 7)
    assert config.forecast == cr.Forecast(1)
    base = generate(pipe)
    with cr.apply(pipe, config) as handle:  # the recommended budget
        generate(pipe)
        stats = handle.stats()
    assert stats["budget"] == 7 and stats["computed"] == 7
    assert stats["forecast"]["transformer"]["order"] == 1
    with cr.apply(pipe, config, budget=4) as handle:
        generate(pipe)
        assert handle.stats()["computed"] == 4
    with cr.apply(pipe, config, budget=STEPS):
        assert torch.equal(generate(pipe), base)


def test_schedule_errors_are_one_line(tmp_path, pipe):
    config = cr.load(schedule_file(tmp_path, pipe))
    with cr.apply(pipe, config):
        with pytest.raises(cr.StepCountError) as info:
            generate(pipe, steps=STEPS + 3)
    message = str(info.value)
    assert f"searched for {STEPS} steps" in message and f"has {STEPS + 3}" in message and "\n" not in message
    assert isinstance(info.value, CalibError)
    with pytest.raises(cr.ScheduleError, match="no schedule for budget 5; it has budgets 4, 7, 12"):
        cr.apply(pipe, config, budget=5)
    with pytest.raises(cr.OptionError, match="a schedule config does not take threshold=; it takes"):
        cr.apply(pipe, config, threshold=0.1)
    with pytest.raises(cr.StepCountError, match="not num_steps=20"):
        cr.apply(pipe.transformer, config, num_steps=20)
    assert "forward" not in vars(pipe.transformer)  # a refused apply leaves no hook behind


@pytest.mark.parametrize("change,where", [
    (lambda d: d["schedules"][0]["components"].update(transformer=[0, 12]), "step 12 is outside 0..11"),
    (lambda d: d["schedules"][0]["components"].update(transformer=[0, 3, 3]), "lists a step twice"),
    (lambda d: d["schedules"][1].update(budget=d["schedules"][0]["budget"]), "appears twice"),
    (lambda d: d.update(recommended={"budget": 5}), "recommended.budget"),
    (lambda d: d.update(steps=0), "steps"),
    (lambda d: d.update(forecast={"kind": "newton", "order": 4}), "forecast"),
    (lambda d: d["schedules"][1]["components"].update(transformer_2=[0]), "components"),
])
def test_bad_schedule_documents_are_refused_by_runtime_and_export(pipe, change, where):
    doc = json.loads(json.dumps(cr.schedule_document_for(
        pipe, steps=STEPS, schedules={7: {"transformer": EVERY_OTHER}, 4: {"transformer": [0, 4, 8, 11]}})))
    change(doc)
    with pytest.raises(cr.CoefficientFileError) as info:
        cr.parse(doc, "x.json")
    assert where in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CalibError) as info:  # the schema or the same code check, in calib's own words
        validate_document(doc, source="x.json")
    assert str(info.value).startswith("x.json: ") and "\n" not in str(info.value)


def test_bare_transformer_schedule(pipe):
    # The pipeline's own steps, run by hand on the bare transformer: the timestep marks the steps.
    base = generate(pipe)
    config = cr.parse(cr.schedule_document_for(pipe.transformer, steps=STEPS,
                                               schedules={STEPS: {"transformer": list(range(STEPS))}}))
    with cr.apply(pipe.transformer, config) as handle:
        assert torch.equal(generate(pipe), base)
        assert handle.stats()["skipped"] == 0


# ---------------------------------------------------------------------------------------------------------------
# wan-digits
# ---------------------------------------------------------------------------------------------------------------
def test_wan_digits_forecast_exact_at_zero_and_full_budget(wan):
    base = generate(wan, "sequential")
    config = cr.parse(cr.document_for(wan.transformer, forecast=cr.Forecast(2, "sigma")))
    with cr.apply(wan, config, threshold=0.0):
        assert torch.equal(generate(wan, "sequential"), base)
    with cr.apply_schedule(wan, {"transformer": list(range(STEPS))}, steps=STEPS, forecast=cr.Forecast(1)):
        assert torch.equal(generate(wan, "sequential"), base)
    with cr.apply_schedule(wan, {"transformer": EVERY_OTHER}, steps=STEPS, forecast=cr.Forecast(1)) as handle:
        out = generate(wan, "sequential")
        stats = handle.stats()
    assert stats["computed"] == 2 * len(EVERY_OTHER) and 0 < rel_l1(out, base) < 0.2


# ---------------------------------------------------------------------------------------------------------------
# forecast errors in the trace, and calib fit choosing the forecast
# ---------------------------------------------------------------------------------------------------------------
def test_traced_forecast_errors_are_the_runtime_forecasts(pipe):
    from calib.store import FORECAST_ORDERS, FORECAST_VARIABLES
    from calib.trace import Tracer

    with Tracer(pipe) as tracer:
        rec = tracer.recorders[0]
        pipe.scheduler.set_timesteps(10)  # a generation: the recorder reads its sigmas
        sigmas = [float(s) for s in pipe.scheduler.sigmas]
        rec.reset()
        torch.manual_seed(0)
        a, b, c = torch.randn(3, 2, 4, 8)
        stack_in = torch.randn(2, 4, 8)
        residuals, tables = [], []
        for step in range(9):
            rec.clock.step = step
            s = sigmas[step]
            residuals.append(a + b * s + c * s * s)  # quadratic in sigma
            tables.append(rec._forecast_errors("call0", residuals[-1], torch.zeros(2, 1), stack_in))
    H = rec.forecast_horizons
    table = torch.stack(tables).reshape(9, len(FORECAST_VARIABLES), len(FORECAST_ORDERS), H, 2)
    v_step, v_sigma = FORECAST_VARIABLES.index("step"), FORECAST_VARIABLES.index("sigma")
    for step in range(9):
        for order in FORECAST_ORDERS:
            for h in range(1, H + 1):
                nodes = [step - j * h for j in range(order + 1, 0, -1)]  # oldest first, as a cache pushes them
                for v, variable in ((v_step, "step"), (v_sigma, "sigma")):
                    got = table[step, v, order, h - 1]
                    if nodes[0] < 0:
                        assert torch.isnan(got).all()
                        continue
                    history = cr.Forecast(order, variable).history()
                    for n in nodes:
                        history.push(n, n if variable == "step" else sigmas[n], residuals[n])
                    pred = history.predict(step, step if variable == "step" else sigmas[step])
                    want = ((pred - residuals[step]).abs().flatten(1).mean(1)
                            / (stack_in + residuals[step]).abs().flatten(1).mean(1))
                    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (step, order, h, variable)
                if order == 2 and nodes[0] >= 0:  # the quadratic in sigma is extrapolated exactly
                    assert float(table[step, v_sigma, 2, h - 1].max()) < 1e-5


def run_calib(*args, cwd):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "calib", *args], cwd=cwd, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    work = tmp_path_factory.mktemp("forecast")
    (work / "prompts.txt").write_text("a handwritten 1\na handwritten 4\na handwritten 7\n")
    run = run_calib("trace", "--model", "builtin:digits", "--prompts", "prompts.txt", "--steps", str(STEPS),
                    "--seeds", "0,1", "--out", "d.h5", cwd=work)
    assert run.returncode == 0, run.stderr
    return work


def test_trace_records_forecast_errors_and_old_traces_still_read(traced, tmp_path):
    import h5py

    from calib.store import TraceWriter, read_traces

    ts = read_traces([traced / "d.h5"])
    t = ts.trajectories[0]
    assert t.forecast_rel_l1.shape == (STEPS, 2, 3, 4) and t.forecast_horizons == 4
    e0, e1 = t.forecast_error(0, "step", 1), t.forecast_error(1, "step", 1)
    assert np.isnan(e0[0]) and np.isfinite(e0[1:]).all()  # reuse needs one earlier step, order 1 two
    assert np.isnan(e1[:2]).all() and np.isfinite(e1[2:]).all()
    assert np.isnan(t.forecast_error(2, "step", 4)[:STEPS]).sum() == STEPS  # 12 steps back: never there
    with h5py.File(traced / "d.h5") as f:
        assert int(f.attrs["schema_version"]) == 1 and int(f.attrs["schema_minor"]) == 1
    # a trace as calib wrote it before the forecast errors: no dataset, no minor version
    old = tmp_path / "old.h5"
    with TraceWriter(old, ts.model_info) as writer:
        writer.append([dataclasses.replace(x, forecast_rel_l1=None) for x in ts.trajectories])
    with h5py.File(old, "r+") as f:
        del f.attrs["schema_minor"]
        assert all("forecast_rel_l1" not in g for g in f["trajectories"].values())
    back = read_traces([old])
    assert all(x.forecast_rel_l1 is None for x in back.trajectories)
    assert back.trajectories[0].forecast_error(1) is None


def test_fit_chooses_a_forecast_and_the_runtime_applies_it(traced, pipe):
    fit = run_calib("fit", "d.h5", "--out", "auto.json", "--no-plot", "--bootstrap", "0", "--degree", "2",
                    cwd=traced)
    assert fit.returncode == 0, fit.stderr
    assert "forecast on skipped steps" in fit.stdout and "kept order" in fit.stdout
    doc = json.loads((traced / "auto.json").read_text())
    validate_document(doc)
    entry = doc["components"]["transformer"]["forecast"]
    assert entry["kind"] == "newton" and entry["order"] in (0, 1, 2) and entry["variable"] in ("step", "sigma")
    candidates = entry["selection"]["candidates"]
    scored = [c for c in candidates if c["held_out_error"] is not None]
    best = min(scored, key=lambda c: c["held_out_error"])
    assert (best["order"], best["variable"], best["rescaler_target"]) == (
        entry["order"], entry["variable"], entry["selection"]["rescaler_target"])
    assert {(c["order"], c["rescaler_target"]) for c in candidates} >= {
        (0, "output_change"), (1, "output_change"), (1, "forecast_error"), (2, "forecast_error")}
    config = cr.load(traced / "auto.json")
    with cr.apply(pipe, config) as handle:
        generate(pipe)
        report = handle.stats()["forecast"]["transformer"]
    assert (report["order"], report["variable"]) == (entry["order"], entry["variable"])


def test_fit_forecast_zero_and_old_traces_fit_as_before(traced, tmp_path):
    from calib.store import TraceWriter, read_traces

    zero = run_calib("fit", "d.h5", "--out", "zero.json", "--no-plot", "--bootstrap", "0", "--degree", "2",
                     "--forecast", "0", cwd=traced)
    assert zero.returncode == 0, zero.stderr
    ts = read_traces([traced / "d.h5"])
    old = tmp_path / "old.h5"
    with TraceWriter(old, ts.model_info) as writer:
        writer.append([dataclasses.replace(x, forecast_rel_l1=None) for x in ts.trajectories])
    plain = run_calib("fit", str(old), "--out", str(tmp_path / "plain.json"), "--no-plot", "--bootstrap", "0",
                      "--degree", "2", cwd=traced)
    assert plain.returncode == 0, plain.stderr
    assert "the traces hold no forecast errors" in plain.stdout
    a = json.loads((traced / "zero.json").read_text())["components"]["transformer"]
    b = json.loads((tmp_path / "plain.json").read_text())["components"]["transformer"]
    assert a["forecast"] == {"kind": "newton", "order": 0, "variable": "step"} and "forecast" not in b
    assert a["coefficients"] == b["coefficients"]  # order 0: the rescaler TeaCache always fitted
    refused = run_calib("fit", str(old), "--out", str(tmp_path / "x.json"), "--no-plot", "--forecast", "1",
                        "--degree", "2", cwd=traced)
    assert refused.returncode == 2
    assert "trace again" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
