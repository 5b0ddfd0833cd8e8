"""The frontier's peers (calib.evaluate.peers): each runs through the harness on the built-in digits model, its
threshold 0 (or a setting that computes every step) reproduces the uncached output exactly, it really skips at a
positive setting, and the model is exactly restored after it; the parts implemented from papers (Spectrum's
schedule and forecaster, EasyCache's rule, SeaCache's FLUX adapter) are checked against what the papers state."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

STEPS = 8


@pytest.fixture(scope="module", params=["batched", "sequential"])
def harness(request):
    """The digits model's harness: 2 prompts x 1 seed, CFG batched in one call or as two calls per step."""
    from calib.evaluate.harness import Harness
    from calib.models.digits import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    h = Harness(load_pipeline(), [("a handwritten 3", 5), ("a handwritten 5", 5)], steps=STEPS, guidance=3.0,
                pipeline_kwargs={"cfg_mode": request.param}, echo=lambda *a: None)
    assert h.calls_per_step == (1 if request.param == "batched" else 2)
    yield h
    h.close()
    torch.set_num_threads(threads)


def _uncached_then_skipping(h, name, exact_install, skipping_install):
    """Runs both settings; asserts the first is the uncached output, the second skips, the model is restored."""
    from calib.evaluate.peers import unrestored

    exact = h.run(name, exact_install, {})
    assert exact.fraction == 1.0 and exact.compute == pytest.approx(1.0)
    assert exact.latent_rel_l1 == 0.0, name
    assert unrestored(h) is None, name
    skipping = h.run(name, skipping_install, {})
    assert skipping.fraction < 1.0 and skipping.compute < 1.0, name
    assert 0.0 < skipping.latent_rel_l1 < 1.0, name  # it reuses something, and it is still the same image roughly
    assert unrestored(h) is None, name
    return skipping


def test_easycache_threshold_zero_is_uncached_and_a_positive_one_skips(harness):
    from calib.evaluate.peers.easycache import easycache_install

    skipping = _uncached_then_skipping(harness, "easycache", easycache_install(harness.transformer, STEPS, 0.0),
                                       easycache_install(harness.transformer, STEPS, 1e3, warmup=2))
    # warm-up 2 and the last step computed; every other step reuses v - x (the threshold is never reached)
    assert skipping.fraction == pytest.approx(3 / STEPS)
    assert skipping.compute == pytest.approx(skipping.fraction)  # the whole transformer is skipped


def test_easycache_skips_more_as_its_threshold_grows(harness):
    from calib.evaluate.peers.easycache import easycache_install

    fractions = [harness.run("easycache", easycache_install(harness.transformer, STEPS, t, warmup=2), {}).fraction
                 for t in (0.05, 0.3, 1e3)]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > fractions[-1]


def test_spectrum_computing_every_step_is_uncached_and_its_schedule_skips(harness):
    from calib.evaluate.peers.spectrum import SpectrumConfig, spectrum_install, spectrum_mask

    config = SpectrumConfig(steps=STEPS, warmup=2, window=2, alpha=0.0)
    skipping = _uncached_then_skipping(
        harness, "spectrum", spectrum_install(harness.transformer, SpectrumConfig(steps=STEPS, warmup=STEPS)),
        spectrum_install(harness.transformer, config))
    assert skipping.fraction == pytest.approx(sum(spectrum_mask(STEPS, 2, 2, 0.0)) / STEPS)
    assert skipping.compute == pytest.approx(skipping.fraction)  # every block is skipped on a forecast step


def test_spectrum_blend_changes_the_forecast_not_the_schedule(harness):
    from calib.evaluate.peers.spectrum import SpectrumConfig, spectrum_install

    points = [harness.run("spectrum", spectrum_install(harness.transformer, SpectrumConfig(
        steps=STEPS, warmup=3, window=2, alpha=0.5, blend=w)), {}) for w in (0.0, 0.5, 1.0)]
    assert len({p.fraction for p in points}) == 1
    assert len({round(p.latent_rel_l1, 9) for p in points}) == 3


def test_seacache_threshold_zero_is_uncached_and_a_positive_one_skips(harness):
    from calib.evaluate.peers.seacache import seacache_install

    scheduler = harness.pipe.scheduler
    skipping = _uncached_then_skipping(
        harness, "seacache", seacache_install(harness.transformer, scheduler, STEPS, threshold=0.0),
        seacache_install(harness.transformer, scheduler, STEPS, threshold=1e3, max_consecutive_cached=2))
    # first and last step forced, then at most 2 reused steps between computed ones
    assert skipping.fraction == pytest.approx(4 / STEPS)
    assert skipping.compute == pytest.approx(skipping.fraction)


def test_taylorseer_with_every_step_warm_is_uncached_and_its_interval_skips(harness):
    from diffusers import TaylorSeerCacheConfig

    from calib.evaluate.peers import diffusers_install
    from calib.evaluate.peers.taylorseer import taylorseer_fraction

    def config(before, interval=2):
        return lambda: TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=before, max_order=3,
                                             taylor_factors_dtype=torch.float32, use_lite_mode=True)

    skipping = _uncached_then_skipping(harness, "taylorseer", diffusers_install(harness.transformer, config(STEPS)),
                                       diffusers_install(harness.transformer, config(2)))
    assert skipping.fraction == pytest.approx(taylorseer_fraction(2, 2, STEPS))


@pytest.mark.parametrize("calibrator", [{}, {"calibrator": "taylorseer", "order": 1},
                                        {"calibrator": "taylorseer", "order": 2}, {"calibrator": "dmd"},
                                        {"calibrator": "foca"}], ids=lambda c: c.get("calibrator", "none"))
def test_cache_dit_threshold_zero_is_uncached_and_each_calibrator_skips(harness, calibrator):
    import cache_dit  # noqa: F401  (the test extra: missing or broken, this test fails)
    from calib.evaluate.peers.cache_dit import cache_dit_adapter, dbcache_install

    adapter = cache_dit_adapter(harness.pipe)
    skipping = _uncached_then_skipping(
        harness, "cache-dit", dbcache_install(harness, adapter, calibrator, threshold=0.0, warmup=0),
        dbcache_install(harness, adapter, calibrator, threshold=1e3, fn=1, bn=1, warmup=2))
    assert skipping.compute > skipping.fraction  # DBCache always pays its first and last block


def test_cache_dit_static_mask_computes_exactly_its_steps(harness):
    import cache_dit  # noqa: F401  (the test extra: missing or broken, this test fails)
    from calib.evaluate.peers import unrestored
    from calib.evaluate.peers.cache_dit import cache_dit_adapter, dbcache_install, every_k_mask

    mask = every_k_mask(3, 2, STEPS)
    point = harness.run("cache-dit", dbcache_install(harness, cache_dit_adapter(harness.pipe),
                                                     {"calibrator": "taylorseer", "order": 2}, threshold=0.0,
                                                     mask=mask), {})
    assert point.fraction == pytest.approx(sum(mask) / STEPS)
    assert unrestored(harness) is None


# ---------------------------------------------------------------------------------------------------------------
# what the papers state
# ---------------------------------------------------------------------------------------------------------------
def test_spectrum_schedule_computes_what_the_paper_reports():
    from calib.evaluate.peers.spectrum import spectrum_mask

    # the reference README: 50 steps, warm-up 5, initial window 2; alpha 0.75 -> 14 network passes, 3.0 -> 10
    assert sum(spectrum_mask(50, 5, 2, 0.75)) == 14
    assert sum(spectrum_mask(50, 5, 2, 3.0)) == 10
    mask = spectrum_mask(30, 3, 2, 0.75)
    assert all(mask[:3]) and not all(mask)
    gaps = [b - a for a, b in zip(*[[i for i, m in enumerate(mask) if m][k:] for k in (0, 1)])]
    assert gaps[2:] == sorted(gaps[2:])  # reuse runs only grow after the warm-up


def test_chebyshev_ridge_forecast_is_exact_on_a_polynomial_and_blends_with_taylor():
    from calib.evaluate.peers.spectrum import ChebyshevRidge, SpectrumConfig

    def cubic(t):
        return torch.tensor([1.0 + 0.2 * t - 0.03 * t ** 2 + 0.001 * t ** 3, -0.5 * t])

    cheb = ChebyshevRidge(SpectrumConfig(steps=20, degree=4, ridge=0.0, blend=1.0))
    taylor = ChebyshevRidge(SpectrumConfig(steps=20, degree=4, ridge=0.0, blend=0.0))
    for t in (0, 1, 2, 4, 7, 10):
        cheb.update(t, cubic(t))
        taylor.update(t, cubic(t))
    assert torch.allclose(cheb.predict(14), cubic(14), atol=1e-3)
    # the first-order Taylor step from the last two computed steps (10 and 7), fractional k = (14 - 10) / 3
    expected = cubic(10) + (4 / 3) * (cubic(10) - cubic(7))
    assert torch.allclose(taylor.predict(14), expected, atol=1e-5)
    ridge = ChebyshevRidge(SpectrumConfig(steps=20, degree=4, ridge=10.0, blend=1.0))
    for t in (0, 1, 2, 4, 7, 10):
        ridge.update(t, cubic(t))
    assert not torch.allclose(ridge.predict(14), cubic(14), atol=1e-3)  # the ridge shrinks the coefficients


def test_step_counter_tells_steps_streams_and_generations():
    from calib.evaluate.peers.common import StepCounter

    counter = StepCounter(3)
    calls = [counter.on_call(torch.tensor([t, t])) for t in (1.0, 1.0, 0.6, 0.6, 0.3, 0.3, 1.0, 1.0, 0.6)]
    assert calls == [(0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False), (2, 0, False), (2, 1, False),
                     (0, 0, True), (0, 1, False), (1, 0, False)]
    early = StepCounter(30)  # a generation that stops early: a rising timestep starts the next one
    assert [early.on_call(t)[::2] for t in (1.0, 0.5, 1.0)] == [(0, True), (1, False), (0, True)]


def test_seacache_sees_flux_tokens_on_their_image_grid():
    from calib.evaluate.peers.seacache import flux_raw_vision
    from calib.models.digits import CHANNELS, TOKENS, build_transformer, position_ids

    transformer = build_transformer()
    hidden = torch.randn(2, TOKENS, CHANNELS)
    _, img_ids = position_ids()
    grids = flux_raw_vision(transformer, (), {"hidden_states": hidden, "img_ids": img_ids})
    side = int(TOKENS ** 0.5)
    assert len(grids) == 2 and grids[0].shape == (CHANNELS, 1, side, side)
    assert torch.equal(grids[1][:, 0], hidden[1].T.reshape(CHANNELS, side, side))


def test_easycache_refuses_a_model_whose_output_is_not_shaped_like_its_input():
    from calib.errors import CalibError
    from calib.evaluate.peers.easycache import EasyCache, EasyCacheConfig

    class Widening(torch.nn.Module):
        def forward(self, hidden_states, timestep):
            return (torch.cat([hidden_states, hidden_states], dim=-1),)

    model = Widening()
    cache = EasyCache(model, EasyCacheConfig(threshold=0.1, steps=4))
    with pytest.raises(CalibError, match="not shaped like its input"):
        model(hidden_states=torch.ones(1, 3), timestep=torch.tensor([1.0]))
    cache.remove()
    assert "forward" not in model.__dict__


# ---------------------------------------------------------------------------------------------------------------
# the rows
# ---------------------------------------------------------------------------------------------------------------
def test_every_peer_module_says_what_is_recommended_and_what_is_swept():
    import calib.evaluate.peers as peers

    modules = [m.name for m in pkgutil.iter_modules(peers.__path__) if m.name != "common"]
    assert {"taylorseer", "seacache", "spectrum", "easycache", "cache_dit"} <= set(modules)
    for name in modules:
        doc = importlib.import_module(f"calib.evaluate.peers.{name}").__doc__ or ""
        assert "recommend" in doc and "wept" in doc, name  # Swept / swept


def test_peer_rows_join_the_frontier_after_calibs_own_with_cache_dit_last():
    from calib.evaluate.frontier import CALIB_ROWS, ROWS
    from calib.evaluate.peers import PEER_ROWS

    assert set(PEER_ROWS) <= set(ROWS) and not set(PEER_ROWS) & set(CALIB_ROWS)
    assert not any(row.calibrated for row in PEER_ROWS.values())
    cache_dit = [m for m in ROWS if m.startswith("cache-dit")]
    assert ROWS[-len(cache_dit):] == tuple(cache_dit)
    assert {"cache-dit-taylorseer", "cache-dit-dmd", "cache-dit-foca", "seacache", "spectrum", "easycache"} <= set(
        PEER_ROWS)


def test_a_peer_that_cannot_run_says_why_in_its_row():
    from calib.evaluate.frontier import run_frontier
    from calib.models.digits import load_pipeline

    result = run_frontier(load_pipeline(), None, None, ["a handwritten 3"], (5,), steps=4, guidance=3.0,
                          rows=("uniform", "fastercache"), echo=lambda *a: None)
    assert "coefficient file" in result["not_applicable"]["uniform"]
    assert "traces" in result["not_applicable"]["fastercache"]
    assert "not applicable" in result["table"]
