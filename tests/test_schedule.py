"""calib fit --method schedule: the search against brute force, and the mask through the CLI as a user runs it."""

from __future__ import annotations

import itertools
import json
import os
import random

import pytest
import yaml

from calib.methods.schedule.measure import split_prompts
from calib.methods.schedule.paths import feasible_budgets, min_sum_path, minimax_path, path_costs, segments


def _all_paths(n, costs, budget):
    for middle in itertools.combinations(range(1, n - 1), budget - 2):
        path = [0, *middle, n - 1]
        if all(j - i == 1 or (i, j) in costs for i, j in zip(path, path[1:])):
            yield path


def _random_costs(rng, n, gap, ties=False):
    return {seg: (rng.choice([0.1, 0.2, 0.3]) if ties else rng.random()) for seg in segments(n, gap)}


@pytest.mark.parametrize("seed", range(12))
def test_dynamic_programmes_match_brute_force(seed):
    rng = random.Random(seed)
    n, gap = rng.randint(3, 9), rng.randint(2, 4)
    costs = _random_costs(rng, n, gap, ties=seed % 3 == 0)
    for budget in range(1, n + 2):
        paths = list(_all_paths(n, costs, budget)) if 2 <= budget <= n else []
        got_sum, got_max = min_sum_path(n, costs, budget), minimax_path(n, costs, budget)
        if not paths:
            assert got_sum is None and got_max is None
            continue
        assert got_sum[0] == 0 and got_sum[-1] == n - 1 and len(got_sum) == budget
        best_sum = min(sum(path_costs(p, costs)) for p in paths)
        assert sum(path_costs(got_sum, costs)) == pytest.approx(best_sum)
        best_max = min(tuple(sorted(path_costs(p, costs), reverse=True)) for p in paths)
        assert tuple(sorted(path_costs(got_max, costs), reverse=True)) == pytest.approx(best_max)
        assert len(got_max) == budget


def test_minimax_differs_from_min_sum_where_one_segment_dominates():
    # 0 -> 2 -> 4: two segments of 0.3 (sum 0.6, max 0.3); 0 -> 3 -> 4: 0.5 + 0 (sum 0.5, max 0.5)
    costs = {(0, 2): 0.3, (2, 4): 0.3, (0, 3): 0.5, (1, 3): 1.0, (1, 4): 1.0, (0, 4): 9.0, (2, 3): 0.0}
    costs = {k: v for k, v in costs.items() if k[1] - k[0] >= 2}
    assert min_sum_path(5, costs, 3) == [0, 3, 4]
    assert minimax_path(5, costs, 3) == [0, 2, 4]


def test_segments_and_budgets():
    segs = segments(6, 3)
    assert (0, 2) in segs and (0, 3) in segs and (0, 4) not in segs and (0, 1) not in segs
    # a two-expert model: forecast steps stay with the expert that computed the segment's first step
    owner = ["transformer"] * 3 + ["transformer_2"] * 3
    assert (1, 3) in segments(6, 3, owner) and (1, 4) not in segments(6, 3, owner) and (3, 5) in segments(6, 3, owner)
    costs = {s: 0.1 for s in segs}
    assert feasible_budgets(6, 3, costs) == [3, 4, 5, 6]


def test_prompt_split_holds_out_a_third():
    prompts = [f"p{i}" for i in range(10)]
    measured, held = split_prompts(prompts)
    assert len(held) == 3 and not set(measured) & set(held) and sorted(measured + held) == sorted(prompts)
    assert split_prompts(["only"]) == (["only"], ["only"])


# ---------------------------------------------------------------------------------------------------------------
# through the CLI: calib trace -> calib fit --method schedule -> calib.runtime.apply
# ---------------------------------------------------------------------------------------------------------------
STEPS = 6


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    import torch

    from calib.cli import main

    work = tmp_path_factory.mktemp("schedule")
    (work / "p.txt").write_text("a handwritten 1\na handwritten 4\n", encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(work)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.6 M-parameter model: more threads only spin on a busy machine
    try:
        assert main(["trace", "--model", "builtin:digits", "--prompts", "p.txt", "--steps", str(STEPS), "--seeds", "0",
                     "--out", "t.h5"]) == 0
        assert main(["fit", "t.h5", "--method", "schedule", "--gap", "3", "--forecast-order", "1,2",
                     "--out", "s.json"]) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return work


def _latents(pipe, prompt="a handwritten 7", seed=3, steps=STEPS):
    import torch

    out = pipe(prompt, num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed),
               output_type="latent")
    return torch.stack(list(out.images))


def test_schedule_file_applies_and_full_budget_is_exact(fitted):
    import torch

    import calib.runtime as cr
    from calib.models.digits import load_pipeline

    doc = json.loads((fitted / "s.json").read_text())
    assert doc["method"] == "schedule" and doc["steps"] == STEPS
    budgets = [s["budget"] for s in doc["schedules"]]
    assert budgets == list(range(3, STEPS + 1))  # gap 3 over 6 steps: at least 3 computed, up to all
    for entry in doc["schedules"]:
        steps = entry["components"]["transformer"]
        assert steps[0] == 0 and steps[-1] == STEPS - 1 and len(steps) == entry["budget"]
        assert entry["search"] in ("min_sum", "minimax") and entry["error"]["holdout_latent_rel_l1"] >= 0
    assert doc["calibration"]["holdout_prompts"] and not (
        set(doc["calibration"]["holdout_prompts"]) & set(doc["calibration"]["measured_prompts"]))
    config = cr.load(fitted / "s.json")
    pipe = load_pipeline()
    reference = _latents(pipe)
    with cr.apply(pipe, config, budget=STEPS) as handle:
        assert torch.equal(_latents(pipe), reference)  # every step computed: bit-exact
        assert handle.stats()["skipped"] == 0
    fewest = min(budgets)
    with cr.apply(pipe, config, budget=fewest) as handle:
        cached = _latents(pipe)
        assert handle.stats()["computed"] == fewest * 1  # batched CFG: one stream
    assert not torch.equal(cached, reference)


def test_schedule_for_another_step_count_is_refused_in_one_line(fitted):
    import calib.runtime as cr
    from calib.models.digits import load_pipeline

    pipe = load_pipeline()
    with cr.apply(pipe, cr.load(fitted / "s.json"), budget=STEPS):
        with pytest.raises(cr.StepCountError) as info:
            _latents(pipe, steps=STEPS + 2)
    message = str(info.value)
    assert "\n" not in message and str(STEPS) in message and str(STEPS + 2) in message, message
    assert torch_equal(_latents(pipe), _latents(pipe))  # the hooks are gone: plain runs again


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_resume_measures_nothing_twice(fitted, capsys):
    from calib.cli import main

    segments = json.loads((fitted / "s.segments.json").read_text())
    assert set(segments["errors"]) == {"newton-o1-step", "newton-o2-step"}
    # gap 3 over 6 steps: (i, i+2) for i < 4 and (i, i+3) for i < 3
    assert sorted(segments["errors"]["newton-o1-step"]) == sorted(
        f"{i}-{j}" for i, j in segments_of(STEPS, 3))
    cwd = os.getcwd()
    os.chdir(fitted)
    try:
        capsys.readouterr()
        assert main(["fit", "t.h5", "--method", "schedule", "--gap", "3", "--forecast-order", "1,2",
                     "--out", "s2.json", "--shard", "0/2"]) == 0
        first = capsys.readouterr().out
        assert "shard 0/2" in first and (fitted / "s2.segments.rank0-of-2.json").exists()
        assert not (fitted / "s2.json").exists()
        # the unsharded run reads shard 0's file and measures only the rest
        assert main(["fit", "t.h5", "--method", "schedule", "--gap", "3", "--forecast-order", "1,2",
                     "--out", "s2.json"]) == 0
        out = capsys.readouterr().out
        half = len(segments_of(STEPS, 3)) * 2
        assert f"{(half + 1) // 2} already measured" in out, out
        assert main(["fit", "t.h5", "--method", "schedule", "--gap", "3", "--forecast-order", "1,2",
                     "--out", "s2.json"]) == 0
        assert f"{half} already measured in s2.segments.json; 0 to measure" in capsys.readouterr().out
        # another gap is another set of segments: refused with one line, not mixed in
        assert main(["fit", "t.h5", "--method", "schedule", "--gap", "2", "--out", "s2.json"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "gap" in err[0] and "--overwrite" in err[0]
    finally:
        os.chdir(cwd)


def segments_of(n, gap):
    return segments(n, gap)


def test_tune_picks_the_budget_and_export_writes_the_mask(fitted, capsys):
    from calib.cli import main

    path = fitted / "s.json"
    assert main(["tune", "--coeffs", str(path), "--speedup", "1.5", "--write"]) == 0
    doc = json.loads(path.read_text())
    assert doc["recommended"]["budget"] == 4  # the largest budget with 6 / B >= 1.5
    capsys.readouterr()
    assert main(["export", str(path), "--format", "cache-dit"]) == 0
    exported = yaml.safe_load(capsys.readouterr().out)  # cache-dit's own config file (cache_dit.load_configs)
    mask = exported["cache_config"]["steps_computation_mask"]
    entry = next(e for e in doc["schedules"] if e["budget"] == 4)
    assert mask == [1 if s in entry["components"]["transformer"] else 0 for s in range(STEPS)]
    assert exported["cache_config"]["steps_computation_policy"] == "static"
    order = doc["forecast"]["order"]
    assert exported["cache_config"].get("taylorseer_order") == (order or None)
    assert exported["cache_config"].get("enable_taylorseer") == (True if order else None)
    assert main(["export", str(path), "--format", "cache-dit", "--budget", "99"]) == 2
    assert "no schedule for budget 99" in capsys.readouterr().err


def test_taylorseer_is_given_every_interval_that_fits_a_target():
    from calib.evaluate.harness import COMPUTE_TARGETS, REACHED
    from calib.evaluate.peers.taylorseer import taylorseer_fraction, taylorseer_settings

    settings = taylorseer_settings(30, COMPUTE_TARGETS)
    for target in COMPUTE_TARGETS:
        fits = [(i, b) for i, b in settings if abs(taylorseer_fraction(i, b, 30) - target) <= REACHED]
        assert len({i for i, _ in fits}) >= 2, target  # several intervals per target, each with its warm-up
    assert all(2 <= i <= 6 and b >= 1 for i, b in settings)


def test_frontier_runs_the_schedule_and_cache_dit_rows(fitted):
    """The schedule row applies the file's budgets; cache-dit's DBCache pays its first block on cached steps, so its
    compute share is above its fraction of full forwards; a peer that cannot run says why."""
    import torch

    import calib.runtime as cr
    from calib.evaluate.frontier import run_frontier
    from calib.models.digits import load_pipeline

    pytest.importorskip("cache_dit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_pipeline()
        result = run_frontier(pipe, None, None, ["a handwritten 3", "a handwritten 5"], (5,), steps=STEPS,
                              guidance=3.0, rows=("cache-dit", "calib-schedule", "calib-forecast"),
                              schedule_config=cr.load(fitted / "s.json"), echo=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    schedule = result["methods"]["calib-schedule"]["points"]
    assert {round(p["fraction"] * STEPS) for p in schedule} == {p["setting"]["budget"] for p in schedule}
    assert all(p["compute"] == pytest.approx(p["fraction"]) for p in schedule)
    dbcache = result["methods"]["cache-dit"]["points"]
    assert any(p["fraction"] < 1 for p in dbcache)
    assert all(p["compute"] >= p["fraction"] for p in dbcache)
    assert "needs coefficients" in result["not_applicable"]["calib-forecast"]
    assert "matched on the compute share" in result["table"]


def test_fit_auto_keeps_the_better_of_gate_and_schedule_and_says_why(fitted, capsys):
    import torch

    from calib.cli import main

    cwd = os.getcwd()
    os.chdir(fitted)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capsys.readouterr()
        assert main(["fit", "t.h5", "--method", "auto", "--compute-fraction", "0.5", "--gap", "3",
                     "--forecast-order", "1", "--out", "auto.json"]) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    doc = json.loads((fitted / "auto.json").read_text())
    verdict = doc["calibration"]["auto"]
    gate, schedule = verdict["gate"]["holdout_latent_rel_l1"], verdict["schedule"]["holdout_latent_rel_l1"]
    assert verdict["kept"] == ("schedule" if schedule <= gate else "gate")
    assert doc["method"] == ("schedule" if verdict["kept"] == "schedule" else "teacache")
    assert verdict["gate"]["compute_fraction"] <= 0.5 + 1e-9 and verdict["schedule"]["compute_fraction"] <= 0.5
    assert verdict["why"] in out and "kept" in verdict["why"]
    assert (fitted / "auto.gate.json").exists() and (fitted / "auto.schedule.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# the model a schedule or auto fit regenerates with: never code or a download named by the trace file
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source, refused", [
    ("os:abort", "calib never runs code a file names"),
    ("evilsrc:pwn", "calib never runs code a file names"),
    ("someone/some-model", "calib downloads nothing a file names"),
])
@pytest.mark.parametrize("method", ["schedule", "auto"])
def test_fit_never_loads_code_or_a_download_the_trace_names(tmp_path, monkeypatch, capsys, source, refused, method):
    import types

    from calib.cli import main
    from calib.jobs import fit as fit_job

    loaded = []
    monkeypatch.setattr(fit_job, "read_traces", lambda paths: types.SimpleNamespace(model_info={"source": source}))
    monkeypatch.setattr(fit_job.model_loading, "load_model", lambda spec, **kw: loaded.append(spec))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.h5").write_bytes(b"")
    assert main(["fit", "t.h5", "--method", method, "--out", "s.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and refused in err[0] and "pass --model" in err[0], err
    assert loaded == [] and "evilsrc" not in __import__("sys").modules


def test_the_model_comes_from_model_a_builtin_name_or_an_existing_folder(tmp_path):
    import types

    from calib.errors import CalibError
    from calib.jobs.fit import model_to_load

    def traced(source):
        return types.SimpleNamespace(model_info={"source": source})

    assert model_to_load("pkg.module:factory", traced("os:abort"), ["t.h5"]) == "pkg.module:factory"  # --model
    assert model_to_load(None, traced("builtin:digits"), ["t.h5"]) == "builtin:digits"
    assert model_to_load(None, traced(str(tmp_path)), ["t.h5"]) == str(tmp_path)
    with pytest.raises(CalibError, match="pass --model"):
        model_to_load(None, traced(None), ["t.h5"])


def test_segment_shards_are_found_by_escaped_name_only(tmp_path):
    """``--out '[ab].json'`` reads and clears its own shard files, never those of a.json or b.json."""
    from calib.store.segments import SegmentStore

    key = {"gap": 3}
    mine, other = SegmentStore(tmp_path / "[ab].json", (0, 2)), SegmentStore(tmp_path / "a.json", (0, 2))
    mine.write(key, {"newton-o1-step": {"0-2": 0.5}})
    other.write(key, {"newton-o1-step": {"0-2": 0.25}})
    (tmp_path / "a.segments.rank1-of-2.json.bak").write_text("{}")
    unsharded = SegmentStore(tmp_path / "[ab].json")
    assert unsharded.shard_files() == [mine.path]
    assert unsharded.read(key) == {"newton-o1-step": {"0-2": 0.5}}
    unsharded.clear()
    assert not mine.path.exists() and other.path.exists()
    with pytest.raises(Exception, match="other settings"):
        other.read({"gap": 4})
