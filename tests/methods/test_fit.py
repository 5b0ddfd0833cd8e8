"""Tests for calib.methods.teacache.fit: the rescaler estimator on plain points, the point sets and fits of a trace
set, and the fit's figure (calib.methods.teacache.figure)."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

from calib.errors import CalibError
from calib.methods.teacache.fit import FitResult, collect_points, fit_all_components, fit_traces, format_diagnostics
from calib.methods.teacache.rescalers import AutoRescaler


def plain_rescaler(degree=4) -> AutoRescaler:
    """The estimator with a fixed degree and no shape constraint: the plain least-squares polynomial."""
    return AutoRescaler(degree=degree, shape="none")

# TeaCache's published FLUX coefficients, highest degree first.
FLUX = np.array([498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861])


def _trajectory(x, y, *, stream="cond", component="transformer"):
    x = np.concatenate([[np.nan], x]).astype(np.float32)
    y = np.concatenate([[np.nan], y]).astype(np.float32)
    return types.SimpleNamespace(component=component, stream=stream, input_rel_l1=x, output_rel_l1=y)


def make_trace_set(n_traj=8, steps=20, noise=0.005, seed=0, components=("transformer",)):
    """A stand-in for calib.store.TraceSet with FLUX-shaped data."""
    rng = np.random.default_rng(seed)
    trajs = []
    for comp in components:
        for i in range(n_traj):
            x = rng.uniform(0.05, 0.35, steps - 1)
            y = np.poly1d(FLUX)(x) + rng.normal(0.0, noise, steps - 1)
            trajs.append(_trajectory(x, y, stream="cond" if i % 2 == 0 else "uncond", component=comp))
    settings = {
        "steps": [steps],
        "guidance": [3.0],
        "resolution": [(8, 8)],
        "streams": ["cond", "uncond"],
        "components": sorted(components),
        "prompts": n_traj // 2,
        "seeds": 1,
    }
    return types.SimpleNamespace(
        model_info={"class": "FluxTransformer2DModel", "source": "builtin:digits", "scheduler": "Euler"},
        trajectories=trajs,
        files=["traces/t.h5"],
        attrs=[],
        settings=lambda: dict(settings),
    )


def _noisy(n=300, groups=10, seed=1, noise=0.005):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.05, 0.35, n)
    y = np.poly1d(FLUX)(x) + rng.normal(0.0, noise, n)
    g = np.repeat(np.arange(groups), math.ceil(n / groups))[:n]
    return x, y, g


def test_fit_recovers_known_polynomial_with_cv():
    x, y, g = _noisy()
    r = plain_rescaler(degree=4).fit(x, y, g)
    assert r.coef_.dtype == np.float64 and r.coef_.shape == (5,)
    # Coefficients of a degree-4 fit over [0.05, 0.35] are ill-determined individually; compare the curve
    # tightly and the coefficients loosely.
    grid = np.linspace(0.05, 0.35, 50)
    np.testing.assert_allclose(np.poly1d(r.coef_)(grid), np.poly1d(FLUX)(grid), atol=0.01)
    np.testing.assert_allclose(r.coef_, FLUX, rtol=0.25, atol=0.05)
    assert r.degree_ == 4
    assert r.r2_ > 0.99
    assert r.mae_ < 0.01 and r.rmse_ < 0.01
    assert r.n_points_ == 300 and r.n_groups_ == 10 and r.n_dropped_ == 0
    assert r.cv_folds_ == 5
    assert np.isfinite(r.cv_mae_) and r.cv_mae_ >= r.mae_ * 0.5 and r.cv_mae_ < 0.02
    assert r.cv_r2_ > 0.98
    assert r.domain_ == (float(x.min()), float(x.max()))


def test_exact_data_is_recovered_exactly():
    x = np.linspace(0.0, 1.0, 40)
    coef = np.array([2.0, -1.0, 0.5])
    r = plain_rescaler(degree=2).fit(x, np.poly1d(coef)(x))
    np.testing.assert_allclose(r.coef_, coef, atol=1e-9)
    assert r.r2_ == pytest.approx(1.0)


def test_predict_is_the_runtimes_and_fit_returns_self():
    """predict evaluates poly1d(coef_) as the runtime does: inputs clamped to the fitted domain, floored at 0."""
    x, y, g = _noisy()
    est = plain_rescaler()
    assert est.fit(x, y, g) is est
    grid = np.linspace(-0.1, 0.5, 33)
    lo, hi = est.domain_
    expected = np.maximum(np.poly1d(est.coef_)(np.clip(grid, lo, hi)), 0.0)
    np.testing.assert_allclose(est.predict(grid), expected, rtol=1e-12)
    inside = np.linspace(lo, hi, 9)
    np.testing.assert_allclose(est.predict(inside), np.poly1d(est.coef_)(inside), rtol=1e-12)
    assert est.predict(0.2).shape == ()
    assert est.get_params()["degree"] == 4 and est.get_params()["shape"] == "none"


def test_cv_needs_two_groups():
    x, y, _ = _noisy()
    r = plain_rescaler().fit(x, y)  # groups=None: one group
    assert r.n_groups_ == 1 and r.cv_folds_ == 0
    assert math.isnan(r.cv_mae_) and math.isnan(r.cv_r2_)
    r = plain_rescaler().fit(x, y, np.r_[np.zeros(150), np.ones(150)])
    assert r.cv_folds_ == 2 and np.isfinite(r.cv_mae_)


def test_non_finite_pairs_are_dropped_and_counted():
    x, y, g = _noisy(n=100)
    x[3] = np.nan
    y[7] = np.inf
    r = plain_rescaler().fit(x, y, g)
    assert r.n_dropped_ == 2 and r.n_points_ == 98


def test_too_few_points_message():
    x = np.array([0.1, 0.2, 0.3, 0.4, np.nan])
    y = np.array([0.1, 0.2, 0.3, 0.5, 0.6])
    with pytest.raises(CalibError) as exc:
        plain_rescaler(degree=4).fit(x, y)
    assert str(exc.value) == (
        "only 4 finite points; a degree-4 fit needs at least 6 — trace more prompts or lower --degree"
    )


def test_constant_x_rejected():
    with pytest.raises(CalibError, match="input changes are equal"):
        plain_rescaler(degree=2).fit(np.full(10, 0.2), np.linspace(0, 1, 10))


@pytest.mark.parametrize("degree", [0, 10, 2.5, "4", True, None])
def test_bad_degree_rejected(degree):
    with pytest.raises(CalibError, match="degree must be 'auto' or an integer from 1 to 9"):
        plain_rescaler(degree=degree).fit(np.linspace(0, 1, 20), np.linspace(0, 1, 20))


def test_length_mismatch_rejected():
    with pytest.raises(CalibError, match=r"x and y differ in length \(20 vs 19\)"):
        plain_rescaler().fit(np.linspace(0, 1, 20), np.linspace(0, 1, 19))
    with pytest.raises(CalibError, match="groups and x differ in length"):
        plain_rescaler().fit(np.linspace(0, 1, 20), np.linspace(0, 1, 20), np.zeros(3))


def test_predict_before_fit_raises():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        plain_rescaler().predict([0.1])


def test_collect_points_skips_nan_trajectory():
    ts = make_trace_set(n_traj=4, steps=10)
    ts.trajectories[1].output_rel_l1[4] = np.nan  # beyond entry 0: whole trajectory skipped
    x, y, groups, streams, skipped = collect_points(ts)
    assert skipped == 1
    # entry 0 has no previous step; the last step is the one the gate forces: 10 - 2 points per trajectory
    assert len(x) == len(y) == len(groups) == len(streams) == 3 * 8
    assert sorted(set(groups.tolist())) == [0, 2, 3]
    assert set(streams.tolist()) == {"cond", "uncond"}
    np.testing.assert_array_equal(x[:8], ts.trajectories[0].input_rel_l1[1:-1].astype(np.float64))
    # opting out keeps the forced last step's pair
    x_all, _, _, _, _ = collect_points(ts, exclude_forced=False)
    assert len(x_all) == 3 * 9
    np.testing.assert_array_equal(x_all[:9], ts.trajectories[0].input_rel_l1[1:].astype(np.float64))

    # stream filter
    x, _, groups, streams, skipped = collect_points(ts, streams=["cond"])
    assert set(streams.tolist()) == {"cond"} and skipped == 0 and sorted(set(groups.tolist())) == [0, 2]


def test_fit_traces_and_all_components():
    ts = make_trace_set(n_traj=6, steps=15, components=("transformer", "transformer_2"))
    ts.trajectories[0].input_rel_l1[3] = np.inf
    res = fit_traces(ts, degree=3)
    assert isinstance(res, FitResult)
    assert res.component == "transformer" and res.n_skipped_trajectories == 1
    assert res.rescaler.degree_ == 3 and res.rescaler.n_groups_ == 5
    assert res.x.shape == res.y.shape == res.groups.shape == res.streams.shape == (5 * 13,)  # 15 - first - last
    assert res.exclude_forced and res.n_excluded == 5

    results = fit_all_components(ts)
    assert list(results) == ["transformer", "transformer_2"]
    table = format_diagnostics(results)
    lines = table.splitlines()
    assert len(lines) == 4
    for col in ("component", "points", "skipped", "R²", "CV MAE", "CV R²", "folds", "domain"):
        assert col in lines[0]
    assert lines[2].startswith("transformer ") and lines[3].startswith("transformer_2")


def test_fit_traces_errors():
    ts = make_trace_set(n_traj=2, steps=4)
    with pytest.raises(CalibError, match=r"no trajectories for component 'vae'"):
        fit_traces(ts, component="vae")
    with pytest.raises(CalibError, match=r"component 'transformer': only 4 finite points"):
        fit_traces(ts, degree=5)
    for t in ts.trajectories:
        t.input_rel_l1[2] = np.nan
    with pytest.raises(CalibError, match="all 2 trajectories contain NaN or Inf"):
        fit_traces(ts)


def test_format_diagnostics_without_cv():
    ts = make_trace_set(n_traj=1, steps=20)
    table = format_diagnostics({"transformer": fit_traces(ts)})
    row = table.splitlines()[2].split()
    assert row[0] == "transformer" and row[9] == "0"  # folds
    assert row[7] == "-" and row[8] == "-"  # CV MAE, CV R² unavailable


def test_the_fit_figure_is_a_png():
    from calib.methods.teacache.figure import plot_fit_png

    ts = make_trace_set(n_traj=4, steps=12, components=("transformer", "transformer_2"))
    data = plot_fit_png(fit_all_components(ts), title="test")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(CalibError, match="nothing to plot"):
        plot_fit_png({})
