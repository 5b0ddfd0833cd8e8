"""Better rescalers than the paper's: degree by held-out error, robust loss, shape constraints, bootstrap band,
Δσ-normalised and alternative indicators (fit, replay and runtime agree), and refusing mixed trace settings."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import calib.runtime as cr
from calib.errors import CalibError
from calib.jobs.fit import run_fit as run_any_fit
from calib.methods.teacache.fit import check_settings
from calib.methods.registry import load_document, validate as validate_document
from calib.methods.teacache.fit import collect_samples, fit_traces, format_fit_report, select_indicator
from calib.methods.teacache.rescalers import CONSTRAINT, AutoRescaler, indicator_series, shape_check
from calib.runtime.gate import Rescaler, TeaCacheGate, replay
from calib.store import TraceSet, TraceWriter, Trajectory
from shipped import shipped

REPO = Path(__file__).resolve().parents[2]


def run_fit(traces, **options):
    return run_any_fit("teacache", traces, **options)

MODEL_INFO = {"class": "FluxTransformer2DModel", "source": "builtin:digits", "config_hash": "sha256:00",
              "scheduler": "FlowMatchEulerDiscreteScheduler", "adapter": "flux", "indicator": "transformer_blocks.0.norm1"}


# --- synthetic trajectories ---------------------------------------------------------------------------------------
def make_traj(x, y, *, prompt="a handwritten 1", seed=0, stream="cond", steps=None, sigmas=None, extra=None,
              guidance=3.0, resolution=(8, 8)):
    """A real store.Trajectory with entry 0 NaN, from per-step changes x, y (length steps - 1)."""
    n = len(x) + 1
    steps = steps or n
    sigmas = np.linspace(1.0, 1.0 / 1000, n) if sigmas is None else sigmas
    nan = lambda a: np.r_[np.nan, a]  # noqa: E731
    return Trajectory(
        prompt=prompt, seed=seed, stream=stream, component="transformer", steps=steps, guidance=guidance,
        resolution=resolution, step_index=np.arange(n), timesteps=np.asarray(sigmas) * 1000, sigmas=sigmas,
        input_rel_l1=nan(x), output_rel_l1=nan(y), residual_rel_l1=nan(y), block_rel_l1=np.zeros((n, 0)),
        block_names=[], extra={k: nan(v) for k, v in (extra or {}).items()},
    )


def trace_set(trajectories, files=("synthetic.h5",)):
    return TraceSet(model_info=dict(MODEL_INFO), trajectories=list(trajectories), files=list(files),
                    attrs=[{} for _ in files], counts=[len(trajectories)] if len(files) == 1 else [])


def rate_law_set(steps, n_gen=8, seed=0, noise=0.03):
    """Generations whose output *rate* is a fixed function of the indicator *rate*: y/Δσ = f(x/Δσ) (the rate law
    the delta_sigma normalisation assumes); temb carries noise only."""
    rng = np.random.default_rng(seed)
    sig = np.linspace(1.0, 0.001, steps)
    ds = sig[:-1] - sig[1:]
    trajs = []
    for g in range(n_gen):
        for stream in ("cond", "uncond"):
            rate = rng.uniform(0.8, 6.0, steps - 1)
            out_rate = 0.2 * rate + 0.08 * rate**2
            y = ds * out_rate * (1 + rng.normal(0, noise, steps - 1))
            trajs.append(make_traj(ds * rate, y, prompt=f"p{g}", seed=g, stream=stream, steps=steps, sigmas=sig,
                                   extra={"temb_rel_l1": rng.uniform(0.05, 0.3, steps - 1),
                                          "block_input_rel_l1": rng.uniform(0.01, 0.1, steps - 1)}))
    return trace_set(trajs)


def noisy_poly(coef, n_gen=10, per=30, noise=0.004, seed=0, lo=0.05, hi=0.35):
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, hi, (n_gen, per))
    y = np.poly1d(coef)(x) + rng.normal(0, noise, x.shape)
    groups = np.repeat(np.arange(n_gen), per)
    return x.ravel(), y.ravel(), groups


# --- the forced last step -----------------------------------------------------------------------------------------
def test_the_forced_last_step_is_left_out_of_the_fit(tmp_path):
    """The gate always computes a generation's last step, so its (x, y) pair never decides a skip; calib fit must
    not let it shape the rescaler. Here it is an extreme outlier: fitted on, it would set the top of the domain."""
    from calib.methods.teacache.fit import forced_last_mask

    rng = np.random.default_rng(5)
    steps, trajs = 20, []
    for g in range(8):
        for stream in ("cond", "uncond"):
            x = np.r_[rng.uniform(0.05, 0.2, steps - 2), 0.9]  # last pair far off the curve, as on the built-ins
            y = np.r_[0.5 * x[:-1] + rng.normal(0, 0.002, steps - 2), 3.0]
            trajs.append(make_traj(x, y, prompt=f"p{g}", seed=g, stream=stream))
    path = tmp_path / "outlier.h5"
    with TraceWriter(path, MODEL_INFO) as w:
        w.append(trajs)
    run_fit([path], out=tmp_path / "o.json", indicator="modulated_input", normalization="none", bootstrap=0,
            plot=False, echo=lambda *a: None)
    comp = load_document(tmp_path / "o.json")["components"]["transformer"]
    gated = np.concatenate([t.input_rel_l1[1:-1] for t in trajs]).astype(np.float64)
    assert comp["domain"] == pytest.approx([gated.min(), gated.max()])  # not 0.9
    assert comp["metrics"]["points"] == len(gated) == 16 * (steps - 2)
    assert comp["fit"]["excluded_steps"]["rule"] == "forced_last" and comp["fit"]["excluded_steps"]["points"] == 16
    top = np.poly1d(comp["coefficients"])(gated.max())
    assert top == pytest.approx(0.5 * gated.max(), abs=0.01)  # the curve is not bent towards (0.9, 3.0)
    # the opt-out (Python API only) fits every pair: the outlier then does set the domain
    everything = fit_traces(trace_set(trajs), degree=2, exclude_forced=False, shape="none")
    assert everything.rescaler.domain_[1] == pytest.approx(0.9) and everything.n_excluded == 0
    # the step left out is the one the offline replay forces: with a rescaler that never adds up, only the first
    # and the forced last step compute
    t = trajs[0]
    decisions = replay(t.input_rel_l1.tolist(), Rescaler([0.0]), threshold=1.0)
    assert np.flatnonzero(decisions).tolist() == [0, steps - 1]
    assert np.flatnonzero(forced_last_mask(t, steps)).tolist() == [steps - 1]


def test_with_two_experts_only_the_generations_last_step_is_left_out():
    """Wan2.2: ``transformer`` runs the high-noise steps, ``transformer_2`` the rest. The runtime forces the
    generation's last step (in transformer_2's trajectory); the high-noise expert's last step is gated like any
    other, so its pair stays in that expert's fit."""
    import dataclasses

    from calib.methods.teacache.fit import forced_last_mask
    from calib.hooking import StepClock

    rng = np.random.default_rng(0)
    n, boundary, trajs = 10, 6, []
    for g in range(2):
        full = make_traj(rng.uniform(0.05, 0.3, n - 1), rng.uniform(0.05, 0.3, n - 1), prompt=f"p{g}", seed=g)
        for component, idx in (("transformer", np.arange(boundary)), ("transformer_2", np.arange(boundary, n))):
            series = {k: np.r_[np.nan, getattr(full, k)[idx][1:]] for k in ("input_rel_l1", "output_rel_l1",
                                                                           "residual_rel_l1")}
            trajs.append(dataclasses.replace(full, component=component, step_index=idx, timesteps=full.timesteps[idx],
                                             sigmas=full.sigmas[idx], block_rel_l1=np.zeros((len(idx), 0)), extra={},
                                             **series))
    ts = trace_set(trajs)
    high, low = collect_samples(ts, "transformer"), collect_samples(ts, "transformer_2")
    assert high.n_excluded == 0 and len(high.x) == 2 * (boundary - 1)  # all but entry 0: none is forced
    np.testing.assert_allclose(high.x[: boundary - 1], trajs[0].input_rel_l1[1:], rtol=1e-6)
    assert low.n_excluded == 2 and len(low.x) == 2 * (n - boundary - 2)  # less entry 0 and the last step
    np.testing.assert_allclose(low.x[: n - boundary - 2], trajs[1].input_rel_l1[1:-1], rtol=1e-6)
    # the rule is the runtime's: the clock's last step of the generation, across both experts
    clock = StepClock()
    clock.new_generation(n)
    runtime_forced = []
    for _ in range(n):
        runtime_forced.append(clock.is_last_step)
        clock.end_step()
    fit_forced = np.concatenate([forced_last_mask(t, len(t.step_index)) for t in trajs[:2]])
    assert fit_forced.tolist() == runtime_forced

    # calib tune replays the same rule: with a threshold no change reaches, the high-noise expert computes only its
    # first step (its last is gated), the low-noise expert its first and the generation's last
    from calib.runtime.gate import Rescaler
    from calib.methods.teacache.tune import replay_trajectories

    rescalers = {c: Rescaler([1.0, 0.0]) for c in ("transformer", "transformer_2")}
    decisions = {t.component: d for t, d in replay_trajectories(trace_set(trajs[:2]), rescalers, 1e9)}
    assert decisions["transformer"] == [True] + [False] * (boundary - 1)
    assert decisions["transformer_2"] == [True] + [False] * (n - boundary - 2) + [True]


# --- degree by cross-validation -----------------------------------------------------------------------------------
def test_auto_degree_finds_the_true_degree_and_forced_degree_is_kept():
    cubic = [40.0, -12.0, 2.5, 0.01]  # increasing on [0.05, 0.35]
    x, y, g = noisy_poly(cubic)
    r = AutoRescaler().fit(x, y, g)
    assert sorted(r.degree_scores_) == [1, 2, 3, 4, 5, 6]
    assert r.degree_ == 3, r.degree_scores_
    assert r.degree_scores_[1] > 1.5 * r.degree_scores_[3]  # underfitting is visible in the held-out table
    assert r.cv_folds_ == 5 and r.n_groups_ == 10
    forced = AutoRescaler(degree=4).fit(x, y, g)
    assert forced.degree_ == 4 and forced.degree_scores_ == {} and "given" in forced.degree_reason_
    with pytest.raises(CalibError, match="degree must be 'auto' or an integer"):
        AutoRescaler(degree="five").fit(x, y, g)


def test_cross_validation_holds_out_whole_generations():
    sig = np.linspace(1, 0.001, 6)
    ts = trace_set([make_traj(np.full(5, 0.1) + i * 0.01, np.full(5, 0.2), prompt=f"p{i // 2}", seed=0,
                              stream=("cond", "uncond")[i % 2], sigmas=sig) for i in range(6)])
    s = collect_samples(ts)
    # cond and uncond of one generation share a CV group, each trajectory keeps its own group for counting
    assert len(np.unique(s.cv_groups)) == 3 and len(np.unique(s.groups)) == 6
    for gen in np.unique(s.cv_groups):
        assert len(np.unique(s.groups[s.cv_groups == gen])) == 2


def test_sklearn_conventions():
    from sklearn.base import clone

    est = AutoRescaler(degree=3, robust=True)
    assert clone(est).get_params() == est.get_params()
    assert est.set_params(degree=2) is est and est.degree == 2
    with pytest.raises(ValueError):
        est.set_params(nope=1)
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        est.predict([0.1])


# --- robust fit ---------------------------------------------------------------------------------------------------
def test_robust_fit_resists_outlying_steps_and_is_compared():
    truth = [3.0, 0.02]
    x, y, g = noisy_poly(truth, n_gen=12, per=30, noise=0.01)
    rng = np.random.default_rng(5)
    bad = rng.choice(len(y), size=len(y) // 12, replace=False)
    y[bad] += rng.uniform(0.5, 1.5, len(bad))  # a few steps from a broken generation
    plain = AutoRescaler(degree=1).fit(x, y, g)
    robust = AutoRescaler(degree=1, robust=True).fit(x, y, g)
    grid = np.linspace(0.05, 0.35, 20)
    err = lambda r: np.max(np.abs(np.poly1d(r.coef_)(grid) - np.poly1d(truth)(grid)))  # noqa: E731
    assert robust.method_ == "huber" and plain.method_ == "least_squares"
    assert err(robust) < 0.3 * err(plain)
    # both losses are scored on held-out generations, whichever is kept
    assert set(plain.method_scores_) == {"least_squares", "huber"} == set(robust.method_scores_)
    assert plain.method_scores_["huber"] < plain.method_scores_["least_squares"]


def test_huber_matches_sklearn_huber_regressor():
    from sklearn.linear_model import HuberRegressor

    x, y, g = noisy_poly([2.0, 0.1], noise=0.02, seed=3)
    y[::17] += 1.0
    ours = AutoRescaler(degree=1, robust=True, shape="none").fit(x, y, g)
    ref = HuberRegressor(epsilon=1.35, alpha=0.0).fit(x[:, None], y)
    np.testing.assert_allclose(ours.coef_, [ref.coef_[0], ref.intercept_], rtol=0.05, atol=0.01)


# --- shape constraints --------------------------------------------------------------------------------------------
def test_shape_check_is_exact():
    assert shape_check([1.0, 0.0], (0.0, 1.0)).ok
    c = shape_check([1.0, -1.0], (0.0, 2.0))  # x - 1: negative left of 1
    assert not c.nonnegative and c.nondecreasing and c.min_value == pytest.approx(-1.0)
    c = shape_check([1.0, 0.0, 0.0], (-1.0, 1.0))  # x^2: decreasing left of 0
    assert c.nonnegative and not c.nondecreasing and c.min_slope == pytest.approx(-2.0)
    # a dip between grid points is found through the critical points
    c = shape_check(np.poly1d([1.0, -0.5001]) ** 2, (0.0, 1.0))
    assert c.nonnegative and not c.nondecreasing


def test_violating_fit_is_refitted_under_the_constraint_and_says_why():
    # saturating data: a free quartic turns down at the right end
    rng = np.random.default_rng(1)
    x = rng.uniform(0.05, 0.35, 400)
    y = 0.6 * (1 - np.exp(-x / 0.06)) + rng.normal(0, 0.01, 400)
    g = np.repeat(np.arange(10), 40)
    free = AutoRescaler(degree=4, shape="none").fit(x, y, g)
    assert not free.plain_shape_.nondecreasing and free.constraint_ == "none"
    kept = AutoRescaler(degree=4).fit(x, y, g)
    assert kept.constraint_ == CONSTRAINT and "decreasing" in kept.reason_
    assert shape_check(kept.coef_, kept.domain_).ok and kept.kept_shape_.ok
    assert math.isfinite(kept.unconstrained_cv_mae_)
    # a fit that already satisfies the constraint is kept as it is
    ok = AutoRescaler(degree=2).fit(x, 2 * x + 0.01 + rng.normal(0, 0.001, 400), g)
    assert ok.constraint_ == "none" and "non-negative and non-decreasing" in ok.reason_
    np.testing.assert_array_equal(ok.coef_, ok.plain_coef_)


def test_measured_documents_must_state_their_domain():
    doc = json.loads((REPO / "coeffs" / "published" / "teacache-flux1-dev.json").read_text())
    validate_document(doc)  # published: domain unknown, allowed
    doc["provenance"] = {"source": "measured"}
    with pytest.raises(CalibError, match="domain: is null, but measured coefficients must state"):
        validate_document(doc, source="f.json")


def _measured_files():
    return shipped((REPO / "coeffs").glob("*.json"))  # not what `calib demo` leaves beside them (gitignored)


# What scripts/make_builtin_coeffs.sh writes: coefficient file -> (model, steps, seeds, guidance).
BUILTIN_COEFFS = {"digits.json": ("builtin:digits", 30, 2, 3.0), "wan-digits.json": ("builtin:wan-digits", 30, 2, 3.0)}


# `or [None]`: an empty list would make pytest skip this test silently; no measured file shipping is a failure.
@pytest.mark.parametrize("path", _measured_files() or [None], ids=lambda p: getattr(p, "name", "none"))
def test_shipped_measured_coefficients_are_monotone_and_nonnegative(path):
    assert path is not None, "coeffs/ ships no measured coefficient file (scripts/make_builtin_coeffs.sh makes them)"
    doc = load_document(path)
    if doc["method"] != "teacache" or (doc.get("provenance") or {}).get("source") != "measured":
        pytest.skip("not a TeaCache rescaler measured by calib")
    for name, comp in doc["components"].items():
        assert comp["domain"] is not None, name
        assert shape_check(comp["coefficients"], comp["domain"]).ok, (name, shape_check(comp["coefficients"], comp["domain"]))


def _builtin_pipe(source):
    from calib.models.loading import load_model

    return load_model(source, device="cpu")


@pytest.mark.parametrize("name", sorted(BUILTIN_COEFFS))
def test_builtin_models_ship_measured_coefficients_for_their_weights(name):
    """coeffs/<model>.json is calib's own default fit on that built-in model, with the settings the script (and, for
    builtin:digits, `calib demo`) traces, and it drives the runtime on the shipped model: some steps skipped, no
    model-mismatch warning, the file's indicator computed."""
    import inspect

    from calib.adapters import model_identity
    from calib.jobs.demo import run_demo
    from calib.trace.prompts import bundled_prompts_path, read_prompts

    source, steps, seeds, guidance = BUILTIN_COEFFS[name]
    path = REPO / "coeffs" / name
    assert path in _measured_files(), f"{path} is missing: run scripts/make_builtin_coeffs.sh"
    assert (REPO / "scripts" / "make_builtin_coeffs.sh").read_text().count("--out \"coeffs/$name.json\"") == 1
    doc = load_document(path)
    assert doc["method"] == "teacache" and doc["provenance"]["source"] == "measured"
    cal = doc["calibration"]
    assert cal["steps"] == [steps] and cal["guidance"] == [guidance] and cal["num_seeds"] == seeds
    assert cal["num_prompts"] == len(read_prompts(bundled_prompts_path(source.split(":", 1)[1])))
    fit = doc["components"]["transformer"]["fit"]
    assert fit["degree_selection"]["mode"] == "auto" and fit["bootstrap"]["resamples"] >= 100  # the default fit
    if name == "digits.json":  # `calib demo` in a checkout rewrites this very file: same settings
        defaults = {k: v.default for k, v in inspect.signature(run_demo).parameters.items()}
        assert (defaults["steps"], len(defaults["seeds"]), defaults["guidance"]) == (steps, seeds, guidance)
        assert Path(defaults["coeffs_dir"]) / name == Path("coeffs") / name

    pipe = _builtin_pipe(source)
    ident = model_identity(pipe.transformer)
    assert doc["model"]["source"] == source
    assert (doc["model"]["class"], doc["model"]["config_hash"]) == (ident["class"], ident["config_hash"])
    config = cr.load(path)
    assert config.indicator == doc["indicator"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model mismatch warns: the file must be for these weights' config
        with cr.apply(pipe, config) as handle:
            pipe(["a handwritten 3", "seven"], num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(1000), output_type="latent")
            stats = handle.stats()
    assert 0 < stats["skipped"] < stats["steps"]


# --- the built-in model, end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    """A small real trace of builtin:digits (bundled prompts x 2 seeds, 12 steps) fitted by run_fit's defaults."""
    from calib.models import digits
    from calib.trace.prompts import bundled_prompts_path, read_prompts
    from calib.trace import Tracer, TraceSettings, describe_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.6 M-parameter model: more threads only spin (30x slower on a busy 2-core box)
    work = tmp_path_factory.mktemp("science")
    pipe = digits.load_pipeline()
    settings = TraceSettings(steps=12, seeds=(0, 1))
    with Tracer(pipe) as tracer:  # in memory, one write: the store's per-generation durability is not under test
        info = describe_model(pipe, "builtin:digits", tracer.adapter)
        trajs = [t for p in read_prompts(bundled_prompts_path("digits")) for s in settings.seeds
                 for t in tracer.trace(p, s, settings)]
    trace = work / "d.h5"
    with TraceWriter(trace, info) as writer:
        writer.append(trajs)
    lines: list[str] = []
    out = run_fit([trace], out=work / "d.json", bootstrap=40, echo=lines.append)
    yield pipe, trace, out, "\n".join(lines)
    torch.set_num_threads(threads)


def test_fit_on_builtin_model_is_monotone_and_documents_its_choices(builtin):
    _, _, out, text = builtin
    doc = load_document(out)
    comp = doc["components"]["transformer"]
    assert shape_check(comp["coefficients"], comp["domain"]).ok
    fit = comp["fit"]
    assert fit["method"] == "least_squares" and fit["constraint"] in ("none", CONSTRAINT) and fit["reason"]
    assert fit["degree_selection"]["mode"] == "auto" and set(fit["degree_selection"]["cv_mae"]) == set("123456")
    assert set(fit["loss_comparison"]) == {"least_squares", "huber"}
    assert fit["bootstrap"]["resamples"] >= 30 and fit["bootstrap"]["max_rel_halfwidth"] > 0
    assert doc["indicator"]["name"] in ("modulated_input", "block_input", "temb")
    assert doc["indicator"]["normalization"] in ("none", "delta_sigma")
    if doc["indicator"]["name"] == "modulated_input":
        assert doc["indicator"]["module"] == "transformer_blocks.0.norm1"
    # the diagnostics print the degree table, the loss comparison, the shape decision and the band
    for part in ("degree by held-out error", "CV MAE", "huber", "shape:", "bootstrap", "indicator by held-out error"):
        assert part in text
    # the JSON records the indicator the held-out ranking kept (the runtime computes it: tests below)
    kept = re.search(r"kept (\w+) / (\w+): ", text)
    assert kept and (doc["indicator"]["name"], doc["indicator"]["normalization"]) == kept.groups()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_indicator_auto_ranks_by_held_out_error_on_builtin(builtin):
    from calib.store import read_traces

    ts = read_traces([builtin[1]])
    choice = select_indicator(ts, degree=4)
    scores = {(r["indicator"], r["normalization"]): r["score"] for r in choice.rows}
    assert set(scores) == {(i, n) for i in ("modulated_input", "block_input", "temb") for n in ("none", "delta_sigma")}
    assert all(math.isfinite(v) for v in scores.values())
    best = min(scores.values())
    assert scores[(choice.indicator, choice.normalization)] <= best * 1.02 + 1e-12
    # on the built-in model the raw block input predicts the output change far worse than the modulated input
    assert scores[("block_input", "none")] > 2 * scores[("modulated_input", "none")]


# --- Δσ normalisation ---------------------------------------------------------------------------------------------
def test_delta_sigma_series_and_transfer_across_step_counts():
    ts30, ts15 = rate_law_set(30), rate_law_set(15, seed=1)
    t = ts30.trajectories[0]
    x, y, scale = indicator_series(t, "modulated_input", "delta_sigma")
    assert math.isnan(scale[0]) and scale[1] == pytest.approx(t.sigmas[0] - t.sigmas[1])
    errors = {}
    for norm in ("none", "delta_sigma"):
        res = fit_traces(ts30, degree="auto", normalization=norm)
        s = collect_samples(ts15, normalization=norm)
        pred = res.rescaler.predict(s.x, s.scale)
        errors[norm] = float(np.mean(np.abs(pred - s.y * s.scale)))
    assert errors["delta_sigma"] < 0.5 * errors["none"], errors
    # with traces at both step counts (allowed explicitly), auto keeps the normalised indicator
    both = trace_set(ts30.trajectories + ts15.trajectories, files=("a.h5", "b.h5"))
    with pytest.raises(CalibError, match="mix steps"):
        check_settings(both)
    choice = select_indicator(both, degree="auto", indicators=["modulated_input", "temb"])
    assert "step-count" in choice.criterion
    assert (choice.indicator, choice.normalization) == ("modulated_input", "delta_sigma"), choice.rows


def test_gate_and_replay_accumulate_delta_sigma_times_rate():
    r = Rescaler([2.0, 0.0], domain=(0.0, 100.0))
    gate = TeaCacheGate(r, threshold=1.0)
    assert gate.should_compute(0.1, scale=0.05) is False and gate.accumulated == pytest.approx(0.05 * 2 * 0.1 / 0.05)
    assert gate.should_compute(0.1, scale=float("nan")) is True and gate.accumulated == 0.0  # unknown Δσ: compute
    assert replay([math.nan, 0.3, 0.3, 0.3], r, 1.0, scales=[math.nan, 0.1, 0.1, 0.1]) == [True, False, True, True]


# --- runtime: the indicator and normalisation the file names --------------------------------------------------------
def _config(pipe, indicator, normalization="none", coefficients=(1e9,)):
    doc = cr.document_for(pipe.transformer, coefficients, domain=(0.0, 1e6), indicator=indicator)
    doc["model"]["adapter"] = "flux"
    doc["indicator"]["normalization"] = normalization
    return cr.parse(doc)


def _what_the_gate_sees(pipe, config, steps, monkeypatch) -> list[tuple]:
    """(change, Δσ scale) the runtime's gate is given at each step of one generation (seed 7, no guidance), with a
    rescaler steep enough that every step computes."""
    seen = []
    original = TeaCacheGate.decide

    def spy(self, change, *, forced=None, scale=None):
        seen.append((change, scale))
        return original(self, change, forced=forced, scale=scale)

    monkeypatch.setattr(TeaCacheGate, "decide", spy)
    with cr.apply(pipe, config, threshold=1.0) as handle:
        pipe("a handwritten 4", num_inference_steps=steps, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(7), output_type="latent")
        assert handle.stats()["computed"] == steps
    return seen


@pytest.mark.parametrize("indicator,normalization", [("modulated_input", "none"), ("block_input", "none"),
                                                     ("temb", "delta_sigma")])
def test_runtime_computes_the_traced_indicator(builtin, monkeypatch, indicator, normalization):
    """With a rescaler so steep that every step computes, the changes (and Δσ) the gate sees equal the traced series."""
    from calib.trace import Tracer, TraceSettings

    pipe = builtin[0]
    steps = 8
    with Tracer(pipe) as tracer:
        traj = tracer.trace("a handwritten 4", 7, TraceSettings(steps=steps, guidance=1.0))[0]
    x, _, scale = indicator_series(traj, indicator, normalization)
    seen = _what_the_gate_sees(pipe, _config(pipe, indicator, normalization), steps, monkeypatch)
    changes = np.array([np.nan if c is None else c for c, _ in seen])
    np.testing.assert_allclose(changes[1:-1], x[1:-1], rtol=1e-4)  # the last step is forced: no change computed
    if normalization == "delta_sigma":
        np.testing.assert_allclose([s for _, s in seen][1:], scale[1:], rtol=1e-6)
    else:
        assert all(s is None for _, s in seen)


def test_runtime_computes_the_indicator_the_shipped_wan_file_records(monkeypatch):
    """builtin:wan-digits' file records the indicator `--indicator auto` kept; the runtime on the Wan adapter must see
    the same per-step changes the tracer recorded for it."""
    from calib.trace import Tracer, TraceSettings

    pipe = _builtin_pipe("builtin:wan-digits")
    doc = load_document(REPO / "coeffs" / "wan-digits.json")
    indicator, normalization = doc["indicator"]["name"], doc["indicator"].get("normalization", "none")
    steps = 8
    with Tracer(pipe) as tracer:
        traj = tracer.trace("a handwritten 4", 7, TraceSettings(steps=steps, guidance=1.0))[0]
    x, _, scale = indicator_series(traj, indicator, normalization)
    doc["components"]["transformer"].update(coefficients=[1e9], degree=0, domain=[0.0, 1e6])  # every step computes
    seen = _what_the_gate_sees(pipe, cr.parse(doc), steps, monkeypatch)
    changes = np.array([np.nan if c is None else c for c, _ in seen])
    assert len(changes) == steps
    np.testing.assert_allclose(changes[1:-1], x[1:-1], rtol=1e-4)
    if normalization == "delta_sigma":
        np.testing.assert_allclose([s for _, s in seen][1:], scale[1:], rtol=1e-6)


def test_delta_sigma_on_a_bare_transformer_needs_sigmas(builtin):
    pipe = builtin[0]
    config = _config(pipe, "modulated_input", "delta_sigma")
    with pytest.raises(ValueError, match="pass sigmas=scheduler.sigmas"):
        cr.apply(pipe.transformer, config, threshold=0.1, num_steps=8)
    pipe.scheduler.set_timesteps(8)
    handle = cr.apply(pipe.transformer, config, threshold=0.1, num_steps=8, sigmas=pipe.scheduler.sigmas)
    handle.remove()


# --- bootstrap band -----------------------------------------------------------------------------------------------
def test_wide_band_warns(tmp_path):
    rng = np.random.default_rng(2)
    trajs = []
    for g in range(4):  # few, very noisy generations: the curve is poorly determined
        x = rng.uniform(0.05, 0.35, 15)
        trajs.append(make_traj(x, np.abs(0.5 * x + rng.normal(0, 0.15, 15)), prompt=f"p{g}", seed=g))
    path = tmp_path / "noisy.h5"
    with TraceWriter(path, MODEL_INFO) as w:
        w.append(trajs)
    with pytest.warns(UserWarning, match="bootstrap band is wide"):
        run_fit([path], out=tmp_path / "n.json", degree=2, indicator="modulated_input", normalization="none",
                bootstrap=60, plot=False, echo=lambda *a: None)
    assert load_document(tmp_path / "n.json")["components"]["transformer"]["fit"]["bootstrap"]["wide"] is True


def test_report_lists_band_and_degree_table():
    x, y, g = noisy_poly([30.0, 0.05], n_gen=6)
    ts = trace_set([make_traj(x[g == i], y[g == i], prompt=f"p{i}") for i in range(6)])
    res = fit_traces(ts, degree="auto", bootstrap=30)
    text = format_fit_report({"transformer": res})
    assert "degree by held-out error" in text and "bootstrap (30 resamples" in text and "ok (wide: > 25%)" in text


# --- merging traces -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,a,b,word", [("steps", 11, 21, "steps"), ("guidance", 3.0, 5.0, "guidance"),
                                            ("resolution", (8, 8), (16, 16), "resolution")])
def test_mixed_settings_are_refused_unless_allowed(tmp_path, capsys, field, a, b, word):
    rng = np.random.default_rng(0)
    paths = []
    for i, value in enumerate((a, b)):
        n = value if field == "steps" else 11
        kw = {field: value} if field != "steps" else {"steps": n}
        trajs = [make_traj(rng.uniform(0.05, 0.3, n - 1), rng.uniform(0.05, 0.3, n - 1), prompt=f"p{j}", seed=i, **kw)
                 for j in range(4)]
        paths.append(tmp_path / f"t{i}.h5")
        with TraceWriter(paths[-1], MODEL_INFO) as w:
            w.append(trajs)
    with pytest.raises(CalibError) as exc:
        run_fit(paths, out=tmp_path / "m.json", plot=False, bootstrap=0, echo=lambda *a: None)
    msg = str(exc.value)
    assert "\n" not in msg and f"mix {word}" in msg and "t0.h5" in msg and "t1.h5" in msg and "--allow-mixed" in msg
    from calib.cli import main

    capsys.readouterr()
    assert main(["fit", *map(str, paths), "--out", str(tmp_path / "cli.json"), "--no-plot"]) == 2
    assert capsys.readouterr().err.strip() == f"calib: error: {msg}" and not (tmp_path / "cli.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_fit(paths, out=tmp_path / "m.json", plot=False, bootstrap=0, degree=2, allow_mixed=True,
                indicator="modulated_input", normalization="none", echo=lambda *a: None)
    assert load_document(tmp_path / "m.json")["calibration"]["num_trajectories"] == 8


def test_cli_degree_option(tmp_path, builtin):
    from calib.cli import main

    trace = builtin[1]
    assert main(["fit", str(trace), "--out", str(tmp_path / "four.json"), "--degree", "4", "--bootstrap", "0",
                 "--indicator", "modulated_input", "--normalization", "none", "--no-plot"]) == 0
    doc = load_document(tmp_path / "four.json")
    assert doc["components"]["transformer"]["degree"] == 4
    assert doc["components"]["transformer"]["fit"]["degree_selection"]["mode"] == "fixed"
    assert main(["fit", str(trace), "--degree", "four"]) == 2


def test_auto_rescaler_is_a_scikit_learn_estimator():
    from sklearn.base import BaseEstimator, clone

    params = {"degree": 3, "robust": True, "shape": "none", "bootstrap": 12, "random_state": 7}
    est = AutoRescaler(**params)
    assert isinstance(est, BaseEstimator)
    assert est.get_params() == params  # exactly the constructor arguments
    twin = clone(est)
    assert twin is not est and type(twin) is AutoRescaler and twin.get_params() == params
    assert repr(est) == "AutoRescaler(degree=3, robust=True, shape='none', bootstrap=12, random_state=7)"
    assert est.set_params(degree=2, bootstrap=0) is est and est.degree == 2 and est.bootstrap == 0
    assert twin.degree == 3  # the clone kept its own parameters
    # unfitted: no fitted attributes (sklearn's convention: they end in "_" and appear only in fit)
    assert not [k for k in vars(est) if k.endswith("_")]
    AutoRescaler(degree="five", shape="bogus")  # __init__ does not validate; fit does
    x, y, g = noisy_poly([2.0, 0.01])
    assert est.fit(x, y, g) is est
    fitted = [k for k in vars(est) if k.endswith("_")]
    assert {"coef_", "degree_", "domain_", "cv_mae_", "band_"} <= set(fitted)
    assert all(k.endswith("_") for k in vars(est) if k not in params)
    assert not [k for k in vars(clone(est)) if k.endswith("_")]  # clone drops the fit
