"""The forecast bases beyond Newton's (calib.runtime.bases) and cond-only steps of batched guidance, on the built-in
models: exact with every step computed, the weights they stand for, what a cond-only step really runs (half the
batch), and the one-line refusals."""

from __future__ import annotations

import functools

import pytest
import torch

import calib.runtime as cr
from calib.runtime.bases import CfgForecast
from calib.runtime.forecast import newton_weights
from calib.runtime.methods.schedule import Schedule, ScheduleConfig
from helpers import generation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 10


generate = functools.partial(generation.generate, steps=STEPS)  # tests/helpers/generation.py


def config(pipe, computed, forecast, cond_only=()):
    budget = len(computed) + 0.5 * len(cond_only)
    budget = int(budget) if float(budget).is_integer() else budget
    schedule = Schedule(budget, {"transformer": tuple(computed)}, forecast=forecast,
                        cond_only={"transformer": tuple(cond_only)} if cond_only else {})
    doc = cr.schedule_document_for(pipe, steps=STEPS, schedules={budget: {"transformer": list(computed)}})
    base = cr.parse(doc)
    return ScheduleConfig(base.model_class, STEPS, {budget: schedule}, config_hash=base.config_hash)


def linear_rows(computed, order):
    """The Newton rule of ``order`` at ``computed``'s skipped steps, as a weight table."""
    rows = []
    for s in range(STEPS):
        if s in computed:
            continue
        before = [c for c in computed if c < s][-(order + 1):]
        rows.append(cr.LinearRow(s, tuple(before), tuple(newton_weights([float(c) for c in before], float(s)))))
    return tuple(rows)


BASES = {
    "linear": lambda computed: cr.LinearForecast(rows=linear_rows(computed, 1)),
    "chebyshev": lambda computed: cr.ChebyshevForecast(degree=2, window=4, ridge=0.1),
    "cfg": lambda computed: CfgForecast(cr.Forecast(1, target="output"), cr.Forecast(2, target="output")),
}


@pytest.mark.parametrize("basis", sorted(BASES))
def test_every_step_computed_is_exactly_uncached(pipe, basis):
    reference = generate(pipe)
    every = tuple(range(STEPS))
    with cr.apply(pipe, config(pipe, every, BASES[basis](every))) as handle:
        assert torch.equal(generate(pipe), reference)
    assert handle.stats()["skipped"] == 0


def test_linear_rows_of_newton_weights_forecast_as_newton(pipe):
    """A weight table holding Newton's weights at the schedule's steps gives Newton's forecast (up to rounding)."""
    computed = (0, 1, 3, 5, 8, 9)
    with cr.apply(pipe, config(pipe, computed, cr.Forecast(1, target="output"))):
        newton = generate(pipe)
    with cr.apply(pipe, config(pipe, computed, BASES["linear"](computed))) as handle:
        table = generate(pipe)
    assert torch.allclose(table, newton, rtol=1e-5, atol=1e-5)
    assert handle.stats()["skipped"] == STEPS - len(computed)


def test_linear_row_for_other_history_falls_back_to_newton(pipe):
    """A row naming steps the stream did not compute is not applied: the Newton fallback forecasts instead."""
    computed = (0, 2, 4, 6, 9)
    wrong = (cr.LinearRow(8, (7,), (5.0,)),)  # step 7 is not computed: the row never fits, Newton forecasts
    with cr.apply(pipe, config(pipe, computed, cr.Forecast(1, target="output"))):
        newton = generate(pipe)
    with cr.apply(pipe, config(pipe, computed, cr.LinearForecast(rows=wrong))):
        fallback = generate(pipe)
    assert torch.allclose(fallback, newton, rtol=1e-5, atol=1e-5)


def test_chebyshev_weights_are_polynomial_extrapolation():
    linear = cr.ChebyshevForecast(degree=1, window=3, ridge=0.0).weights([0.0, 1.0, 2.0], 4.0)
    assert linear == pytest.approx([-7 / 6, 1 / 3, 11 / 6])  # the least-squares line through three points, at 4
    quadratic = cr.ChebyshevForecast(degree=2, window=3, ridge=0.0).weights([0.0, 1.0, 2.0], 3.0)
    assert quadratic == pytest.approx(newton_weights([0.0, 1.0, 2.0], 3.0))
    shrunk = cr.ChebyshevForecast(degree=2, window=3, ridge=10.0).weights([0.0, 1.0, 2.0], 3.0)
    assert sum(shrunk) == pytest.approx(1.0)  # the constant is never shrunk: a constant value is forecast exactly


def test_cond_only_steps_run_half_the_batch_and_count_half(pipe):
    """A cond-only step calls the transformer on the conditional rows only; stats() counts it as partial and the
    compute fraction charges it half a step."""
    computed, cond_only = (0, 3, 6, 9), (1, 4, 5, 7)
    batches = []  # the batch each run of the model's body saw (its input embedding runs only when the body does)
    hook = pipe.transformer.x_embedder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        with cr.apply(pipe, config(pipe, computed, BASES["cfg"](computed), cond_only)) as handle:
            out = generate(pipe)
    finally:
        hook.remove()
    assert batches == [4 if s in computed else 2 for s in sorted(computed + cond_only)]
    stats = handle.stats()
    assert stats["partial"] == len(cond_only)
    assert stats["compute_fraction"] == pytest.approx((len(computed) + 0.5 * len(cond_only)) / STEPS)
    assert torch.isfinite(out).all()


def test_cond_only_steps_beat_skipping_them_on_wan(wan):
    """On the video model, computing the conditional branch (half the batch) is closer to uncached than skipping."""
    reference = generate(wan)
    computed = (0, 3, 6, 9)
    forecast = BASES["cfg"](computed)
    errors = {}
    for cond_only in ((), (1, 4, 7)):
        with cr.apply(wan, config(wan, computed, forecast, cond_only)):
            out = generate(wan)
        errors[cond_only] = float((out - reference).abs().mean() / reference.abs().mean())
    assert errors[(1, 4, 7)] < errors[()]


def test_cfg_forecast_refuses_a_call_that_is_not_a_guidance_batch(pipe):
    """Guidance 1 with two prompts: the halves of the batch are two prompts, not two branches: one line."""
    computed = (0, 3, 6, 9)
    with cr.apply(pipe, config(pipe, computed, BASES["cfg"](computed), (1, 4))):
        with pytest.raises(cr.ScheduleError, match="classifier-free guidance batched in one call"):
            generate(pipe, guidance=1.0)


@pytest.mark.parametrize("entry, message", [
    ({"kind": "linear", "rows": [{"step": 3, "from": [4], "weights": [1.0]}]}, "sources must be distinct computed"),
    ({"kind": "linear", "rows": [{"step": 3, "from": [1], "weights": [float("inf")]}]}, "finite"),
    ({"kind": "linear", "rows": "x"}, "expected a list"),
    ({"kind": "chebyshev", "degree": 9}, "degree must be"),
    ({"kind": "chebyshev", "window": 1, "degree": 2}, "window must be"),
    ({"kind": "cfg", "cond": {"kind": "newton", "order": 1}}, "diff: expected a forecast entry"),
    ({"kind": "cfg", "cond": {"kind": "newton", "order": 1}, "diff": {"kind": "newton", "order": 1},
      "batch_order": ["a", "b"]}, "batch_order"),
])
def test_bad_forecast_entries_are_one_line(entry, message):
    with pytest.raises(cr.ForecastError, match=message):
        cr.ForecastSpec.from_json(entry)


def test_schedule_file_with_cond_only_steps_round_trips(pipe):
    doc = cr.schedule_document_for(pipe, steps=STEPS, schedules={5: {"transformer": [0, 3, 6, 9]}})
    doc["schedules"][0]["budget"] = 5.5
    doc["schedules"][0]["cond_only"] = {"transformer": [1, 4, 7]}
    with pytest.raises(cr.CoefficientFileError, match="cond-only steps need a cfg forecast"):
        cr.parse(doc)
    doc["schedules"][0]["forecast"] = BASES["cfg"](()).as_json()
    loaded = cr.parse(doc)
    assert loaded.schedule(5.5).cond_only == {"transformer": (1, 4, 7)}
    doc["schedules"][0]["cond_only"] = {"transformer": [3]}
    with pytest.raises(cr.CoefficientFileError, match="computes in full"):
        cr.parse(doc)
