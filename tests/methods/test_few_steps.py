"""Few-step models (issue 24): every fit says whether any skip keeps the quality bar (calib.methods.quality) instead
of returning a threshold or budget that wrecks the output; the verdict agrees with measured cached runs.

builtin:digits traced at 4 steps is a few-step case (each step carries a quarter of the trajectory); at 30 steps the
fit recommends a threshold as it always did."""

from __future__ import annotations

import json

import pytest

from calib.methods.quality import DEFAULT_MAX_ERROR
from cli_runner import run_cli
from helpers import generation

pytestmark = pytest.mark.usefixtures("one_thread")

CALIBRATION = "a handwritten 1\na handwritten 4\na handwritten 7\nthe digit three\n"
HELD_OUT = ("a handwritten 2", "a handwritten 5", "a handwritten 8")  # neither traced nor searched on
SEEDS = (7, 8)
FIT = ["--indicator", "modulated_input", "--normalization", "none", "--bootstrap", "0", "--no-plot"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Traces of the calibration prompts x seeds 0, 1 at 4 and 30 steps, and their teacache fits."""
    work = tmp_path_factory.mktemp("few-steps")
    (work / "p.txt").write_text(CALIBRATION, encoding="utf-8")
    for steps in (4, 30):
        code, _, err = run_cli(["trace", "--model", "builtin:digits", "--prompts", "p.txt", "--steps", steps,
                                "--seeds", "0,1", "--out", f"t{steps}.h5"], work)
        assert code == 0, err
        code, out, err = run_cli(["fit", f"t{steps}.h5", *FIT, "--out", f"c{steps}.json"], work)
        assert code == 0, err
        (work / f"fit{steps}.txt").write_text(out, encoding="utf-8")
    return work


@pytest.fixture(scope="module")
def pipe():
    from calib.models.digits import load_pipeline

    return load_pipeline()


def measured(pipe, steps: int, install) -> tuple[float, dict]:
    """(mean over the held-out generations of the final-latent rel-L1 against the uncached one, the cache's stats)."""
    from calib.evaluate.metrics import latent_rel_l1

    errors, stats = [], {}
    for seed in SEEDS:
        reference = generation.generate(pipe, None, seed, HELD_OUT, steps=steps)
        with install() as handle:
            cached = generation.generate(pipe, None, seed, HELD_OUT, steps=steps)
            stats = handle.stats()
        errors += [latent_rel_l1(r, c) for r, c in zip(reference, cached)]
    return sum(errors) / len(errors), stats


def test_at_4_steps_the_fit_recommends_no_cache_with_the_numbers(work):
    doc = json.loads((work / "c4.json").read_text())
    verdict = doc["recommendation"]
    assert verdict["cache"] is False and verdict["steps"] == 4 and verdict["basis"] == "predicted"
    assert verdict["max_error"] == DEFAULT_MAX_ERROR
    cheapest = verdict["cheapest_skip"]
    assert cheapest["error"] > DEFAULT_MAX_ERROR and cheapest["step"] in (1, 2)
    assert doc["thresholds"]["recommended"] == 0.0  # the runtime computes every step
    assert "no cache" in doc["thresholds"]["criterion"]
    line = next(l for l in (work / "fit4.txt").read_text().splitlines() if "no cache recommended" in l)
    assert line == verdict["reason"]
    assert line.startswith(f"no step can be skipped below {DEFAULT_MAX_ERROR:g} latent rel-L1 at 4 steps")
    assert f"{cheapest['error']:.4g}" in line


def test_the_no_cache_file_computes_every_step_and_leaves_the_output_alone(work, pipe):
    import torch

    import calib.runtime as cr

    config = cr.load(work / "c4.json")
    reference = generation.generate(pipe, None, SEEDS[0], HELD_OUT, steps=4)
    with cr.apply(pipe, config) as handle:  # the file's recommended threshold
        cached = generation.generate(pipe, None, SEEDS[0], HELD_OUT, steps=4)
        stats = handle.stats()
    assert stats["compute_fraction"] == 1.0 and stats["skipped"] == 0
    assert torch.equal(cached, reference)


def test_the_skips_the_fit_rejected_measure_above_the_bar(work, pipe):
    """Each step the gate could skip, skipped alone (the residual reused, as the file's gate does), and the gate at
    the smallest threshold of the file's table that skips anything: measured on held-out prompts and seeds, every
    one is over the bar the fit compared its prediction with."""
    import calib.runtime as cr

    doc = json.loads((work / "c4.json").read_text())
    for step in (1, 2):
        keep = [s for s in range(4) if s != step]
        error, stats = measured(pipe, 4, lambda: cr.apply_schedule(pipe, {"transformer": keep}, steps=4))
        assert stats["compute_fraction"] == 0.75
        assert error > DEFAULT_MAX_ERROR, (step, error)
    skipping = min(r["threshold"] for r in doc["thresholds"]["table"] if r["compute_fraction"] < 1)
    config = cr.load(work / "c4.json")
    error, stats = measured(pipe, 4, lambda: cr.apply(pipe, config, threshold=skipping))
    assert stats["compute_fraction"] < 1 and error > DEFAULT_MAX_ERROR, (skipping, error)


def test_at_30_steps_the_recommendation_is_as_before_and_measures_within_the_bar(work, pipe):
    import calib.runtime as cr
    from calib.methods.teacache.tune import recommend, rescalers_of, threshold_table
    from calib.store import read_traces

    doc = json.loads((work / "c30.json").read_text())
    verdict = doc["recommendation"]
    assert verdict["cache"] is True and verdict["cheapest_skip"]["error"] < DEFAULT_MAX_ERROR
    rescalers, indicator, normalization = rescalers_of(doc)
    table = threshold_table(read_traces([work / "t30.h5"]), rescalers, indicator=indicator,
                            normalization=normalization)
    assert doc["thresholds"]["recommended"] == recommend(table).threshold > 0  # the rule of earlier calib
    assert verdict["chosen"]["threshold"] == doc["thresholds"]["recommended"]
    assert verdict["chosen"]["predicted_error"] <= DEFAULT_MAX_ERROR
    assert "no cache" not in (work / "fit30.txt").read_text()
    error, stats = measured(pipe, 30, lambda: cr.apply(pipe, cr.load(work / "c30.json")))
    assert stats["compute_fraction"] < 0.7 and error <= DEFAULT_MAX_ERROR


def test_the_bar_is_an_option(work):
    """--max-error moves the verdict: a bar over the cheapest skip's prediction recommends a threshold again, held
    to that bar."""
    cheapest = json.loads((work / "c4.json").read_text())["recommendation"]["cheapest_skip"]["error"]
    bar = round(cheapest * 3, 4)
    code, out, err = run_cli(["fit", "t4.h5", *FIT, "--max-error", bar, "--out", "loose.json"], work)
    assert code == 0, err
    doc = json.loads((work / "loose.json").read_text())
    assert doc["recommendation"]["cache"] is True and doc["recommendation"]["max_error"] == bar
    assert doc["thresholds"]["recommended"] > 0 and doc["recommendation"]["chosen"]["predicted_error"] <= bar
    assert "no cache" not in out
    code, _, err = run_cli(["fit", "t4.h5", *FIT, "--max-error", "-1", "--out", "bad.json"], work)
    assert code == 2 and "--max-error" in err and len(err.strip().splitlines()) == 1


def test_tune_on_a_no_cache_file_says_so_instead_of_a_threshold(work):
    import shutil

    shutil.copy(work / "c4.json", work / "tuned.json")
    code, out, err = run_cli(["tune", "t4.h5", "--coeffs", "tuned.json", "--speedup", "2", "--write"], work)
    assert code == 0, err
    doc = json.loads((work / "tuned.json").read_text())
    assert doc["thresholds"]["recommended"] == 0.0 and doc["recommendation"]["cache"] is False
    line = next(l for l in out.splitlines() if "no cache recommended" in l)
    assert "at 4 steps" in line and "--speedup 2 not applied" in line
    assert "<- chosen" not in out

    # a 30-step file tunes as before: a threshold for the goal
    shutil.copy(work / "c30.json", work / "tuned30.json")
    code, out, err = run_cli(["tune", "t30.h5", "--coeffs", "tuned30.json", "--speedup", "1.5"], work)
    assert code == 0, err
    assert "<- chosen" in out and "no cache" not in out
