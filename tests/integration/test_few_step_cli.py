"""Few-step models through the CLI (issue 24): ``calib fit --method auto`` on builtin:digits traced at 4 steps
measures the cheapest skip when no searched budget keeps the quality bar, recommends it where it keeps the bar and no
cache where it does not; ``calib tune`` says the same; the file applies as it says; the frontier shows the no-cache
answer as a row (every step computed, error 0) next to a peer."""

from __future__ import annotations

import json

import pytest

from calib.methods.quality import DEFAULT_MAX_ERROR
from cli_runner import run_cli
from helpers import generation

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
HELD_OUT = ("a handwritten 2", "a handwritten 8")
SEED = 7
SEARCH = ["--fractions", "0.5", "--forecast-targets", "output", "--forecast-order", "1", "--search-evals", "3",
          "--no-cond-only"]
TIGHT = 0.0005  # a bar under what skipping even the last step costs here (about 0.001-0.002 measured)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("few-steps-cli")
    (work / "p.txt").write_text("a handwritten 1\na handwritten 4\na handwritten 7\n", encoding="utf-8")
    code, _, err = run_cli(["trace", "--model", "builtin:digits", "--prompts", "p.txt", "--steps", STEPS, "--seeds",
                            "0", "--out", "t.h5"], work)
    assert code == 0, err
    for name, bar in (("auto", DEFAULT_MAX_ERROR), ("tight", TIGHT)):
        code, out, err = run_cli(["fit", "t.h5", "--method", "auto", *SEARCH, "--max-error", bar, "--out",
                                  f"{name}.json"], work)
        assert code == 0, err
        (work / f"{name}.txt").write_text(out, encoding="utf-8")
    return work


@pytest.fixture(scope="module")
def pipe():
    from calib.models.digits import load_pipeline

    return load_pipeline()


def measured(pipe, install) -> tuple[float, dict]:
    from calib.evaluate.metrics import latent_rel_l1

    reference = generation.generate(pipe, None, SEED, HELD_OUT, steps=STEPS)
    with install() as handle:
        cached = generation.generate(pipe, None, SEED, HELD_OUT, steps=STEPS)
        stats = handle.stats()
    errors = [latent_rel_l1(r, c) for r, c in zip(reference, cached)]
    return sum(errors) / len(errors), stats


def test_halving_fails_the_bar_so_the_cheapest_skip_is_measured_and_recommended(work, pipe):
    import calib.runtime as cr

    doc = json.loads((work / "auto.json").read_text())
    out = (work / "auto.txt").read_text()
    assert "no budget keeps the quality bar" in out and "searching the cheapest skip, budget 3" in out
    assert doc["method"] == "schedule" and doc["calibration"]["auto"]["over_bar"] is True
    half = next(e for e in doc["schedules"] if e["budget"] == 2)
    assert half["error"]["holdout_latent_rel_l1"] > DEFAULT_MAX_ERROR
    verdict = doc["recommendation"]
    assert verdict["cache"] is True and verdict["basis"] == "measured"
    assert doc["recommended"]["budget"] == verdict["chosen"]["budget"] == 3
    assert verdict["chosen"]["error"] <= DEFAULT_MAX_ERROR
    # the measured run agrees: the recommended budget is within the bar on other prompts and seeds, halving is not
    config = cr.load(work / "auto.json")
    error, stats = measured(pipe, lambda: cr.apply(pipe, config))
    assert stats["compute_fraction"] == 0.75 and error <= DEFAULT_MAX_ERROR
    error, _ = measured(pipe, lambda: cr.apply(pipe, config, budget=2))
    assert error > DEFAULT_MAX_ERROR


def test_when_nothing_keeps_the_bar_auto_writes_a_no_cache_file(work, pipe):
    import torch

    import calib.runtime as cr

    doc = json.loads((work / "tight.json").read_text())
    verdict = doc["recommendation"]
    assert verdict["cache"] is False and verdict["max_error"] == TIGHT and verdict["steps"] == STEPS
    cheapest = verdict["cheapest_skip"]
    assert cheapest["budget"] == 3 and cheapest["error"] > TIGHT
    assert doc["calibration"]["auto"]["kept"] == "no cache"
    assert doc["recommended"]["budget"] == STEPS
    line = next(l for l in (work / "tight.txt").read_text().splitlines() if l.startswith("no step can be skipped"))
    assert line == verdict["reason"] and f"below {TIGHT:g} latent rel-L1 at {STEPS} steps" in line
    assert line.endswith("no cache recommended") and f"{cheapest['error']:.4g}" in line
    for suffix in (".gate.json", ".schedule.json"):
        assert (work / f"tight{suffix}").exists()

    # the file computes every step: the output is the uncached one
    config = cr.load(work / "tight.json")
    reference = generation.generate(pipe, None, SEED, HELD_OUT, steps=STEPS)
    with cr.apply(pipe, config) as handle:
        cached = generation.generate(pipe, None, SEED, HELD_OUT, steps=STEPS)
        assert handle.stats()["compute_fraction"] == 1.0
    assert torch.equal(cached, reference)

    # the skip it rejected, run: over the bar on other prompts and seeds too
    error, stats = measured(pipe, lambda: cr.apply(pipe, config, budget=cheapest["budget"]))
    assert stats["compute_fraction"] == 0.75 and error > TIGHT


def test_tune_on_the_no_cache_file_says_so(work):
    code, out, err = run_cli(["tune", "--coeffs", "tight.json", "--speedup", "2", "--write"], work)
    assert code == 0, err
    line = next(l for l in out.splitlines() if "no cache recommended" in l)
    assert "--speedup 2 not applied" in line
    assert json.loads((work / "tight.json").read_text())["recommended"]["budget"] == STEPS


def test_the_frontier_shows_the_no_cache_answer_next_to_a_peer(work, pipe):
    import calib.runtime as cr
    from calib.evaluate.frontier import run_frontier
    from calib.store import read_traces

    gate, trace_set = cr.load(work / "tight.gate.json"), read_traces([work / "t.h5"])  # what the peer runs on
    result = run_frontier(pipe, gate, trace_set, list(HELD_OUT), (SEED,), steps=STEPS, guidance=3.0,
                          rows=("calib-auto", "uniform"), auto_config={0.5: cr.load(work / "tight.json")},
                          echo=lambda *a: None)
    points = result["methods"]["calib-auto"]["points"]
    assert len(points) == 1
    assert points[0]["fraction"] == 1.0 and points[0]["compute"] == 1.0 and points[0]["latent_rel_l1"] == 0.0
    row = next(l for l in result["table"].splitlines() if l.startswith("| calib auto"))
    assert "no cache: 100.0% (100.0%) | 0.0000" in row
    assert "no cache recommended (the file computes every step)" in result["table"]
    assert "uniform" not in result["not_applicable"]
    assert all(p["latent_rel_l1"] > TIGHT for p in result["methods"]["uniform"]["points"] if p["fraction"] < 1)


def test_the_frontier_states_the_budget_auto_recommends_within_the_bar(work, pipe):
    """Matched at 50 % of forwards auto's schedule is over the bar at 4 steps; the table says which budget the file
    recommends instead and what it measured."""
    import calib.runtime as cr
    from calib.evaluate.frontier import run_frontier

    result = run_frontier(pipe, None, None, list(HELD_OUT), (SEED,), steps=STEPS, guidance=3.0, rows=("calib-auto",),
                          auto_config={0.5: cr.load(work / "auto.json")}, echo=lambda *a: None)
    points = result["methods"]["calib-auto"]["points"]
    at_half = result["at_target"]["calib-auto"]["0.5000"]
    assert at_half["fraction"] == 0.5 and at_half["latent_rel_l1"] > DEFAULT_MAX_ERROR
    within = next(p for p in points if p["setting"].get("within_bar"))
    assert within["fraction"] == 0.75 and within["latent_rel_l1"] <= DEFAULT_MAX_ERROR
    assert "the file recommends budget 3 of 4" in result["table"]
