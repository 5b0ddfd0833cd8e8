"""calib fit --method schedule|auto: the joint search's candidates, and the search through the CLI as a user runs it
(trace -> fit -> apply, resume and shards, tune, the cache-dit export, the frontier rows)."""

from __future__ import annotations

import functools
import json
import os

import pytest
import yaml

from calib.methods.schedule.joint import Plan, budget_for, neighbours, starting_plans
from calib.methods.schedule.measure import split_prompts
from helpers import generation


# ---------------------------------------------------------------------------------------------------------------
# the candidates: every plan spends exactly its budget, keeps the required steps, stays in range
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [6, 10, 30])
@pytest.mark.parametrize("fraction", [0.5, 1 / 3, 0.25])
@pytest.mark.parametrize("halves", [False, True])
def test_starting_plans_spend_exactly_the_budget(steps, fraction, halves):
    budget = budget_for(fraction, steps, halves=halves)
    assert budget >= 2 and (budget * 2 == int(budget * 2)) and (halves or budget == int(budget))
    required = (0, steps // 2)  # a two-expert model: each expert's first step computes in full
    plans = starting_plans(steps, budget, cond_only=halves, required=required)
    assert plans, (steps, budget)
    assert len(set(plans)) == len(plans)
    for plan in plans:
        assert plan.cost == budget
        assert set(required) <= set(plan.full)
        assert not set(plan.full) & set(plan.cond_only)
        assert all(0 <= s < steps for s in plan.full + plan.cond_only)
    if halves and budget != int(budget):
        assert all(plan.cond_only for plan in plans)  # half a forward is only spent on cond-only steps


def test_neighbours_move_one_step_and_keep_the_budget_and_the_required_steps():
    plan = Plan.of([0, 3, 6], [8])
    moved = list(neighbours(plan, 10, required=(0,)))
    assert moved and all(p.cost == plan.cost for p in moved)
    assert all(0 in p.full for p in moved)
    for p in moved:
        changed = (set(plan.full) ^ set(p.full)) | (set(plan.cond_only) ^ set(p.cond_only))
        assert len(changed) == 2 and max(changed) - min(changed) <= 2  # one step moved by one or two
    assert Plan.of([0, 9], [9]).cond_only == ()  # a step is full or cond-only, never both


def test_prompt_split_holds_out_a_third():
    prompts = [f"p{i}" for i in range(10)]
    measured, held = split_prompts(prompts)
    assert len(held) == 3 and not set(measured) & set(held) and sorted(measured + held) == sorted(prompts)
    assert split_prompts(["only"]) == (["only"], ["only"])


# ---------------------------------------------------------------------------------------------------------------
# through the CLI: calib trace -> calib fit --method schedule -> calib.runtime.apply
# ---------------------------------------------------------------------------------------------------------------
STEPS = 6
# --max-error 1: these tests are about the search itself; at 6 steps the default quality bar would add the cheapest
# skip's budget (tests/methods/test_few_steps.py tests the bar)
NO_BAR = ["--max-error", "1"]
SEARCH = ["--fractions", "0.5,0.34", "--forecast-targets", "output,residual", "--forecast-order", "1",
          "--search-evals", "3", *NO_BAR]


def _run(work, *args):
    import torch

    from calib.cli import main

    cwd = os.getcwd()
    os.chdir(work)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.6 M-parameter model: more threads only spin on a busy machine
    try:
        return main(list(args))
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    work = tmp_path_factory.mktemp("schedule")
    (work / "p.txt").write_text("a handwritten 1\na handwritten 4\na handwritten 7\n", encoding="utf-8")
    assert _run(work, "trace", "--model", "builtin:digits", "--prompts", "p.txt", "--steps", str(STEPS), "--seeds",
                "0", "--out", "t.h5") == 0
    assert _run(work, "fit", "t.h5", "--method", "schedule", *SEARCH, "--out", "s.json") == 0
    return work


# one prompt, the pipeline's own CFG layout (tests/helpers/generation.py)
_latents = functools.partial(generation.generate, mode=None, seed=3, prompts=("a handwritten 7",), steps=STEPS)


def test_the_schedule_file_records_the_search_and_applies_as_measured(fitted):
    import torch

    import calib.runtime as cr
    from calib.models.digits import load_pipeline

    doc = json.loads((fitted / "s.json").read_text())
    assert doc["method"] == "schedule" and doc["steps"] == STEPS
    assert doc["calibration"]["cfg"] == "batched"  # the built-in digits model batches [uncond, cond]
    # 0.5 and 0.34 of 6 steps; batched guidance allows half forwards (cond-only steps)
    assert sorted(s["budget"] for s in doc["schedules"]) == [2.0, 3.0]
    assert doc["calibration"]["holdout_prompts"] and not (
        set(doc["calibration"]["holdout_prompts"]) & set(doc["calibration"]["measured_prompts"]))
    config = cr.load(fitted / "s.json")
    pipe = load_pipeline()
    reference = _latents(pipe)
    for entry in doc["schedules"]:
        full = entry["components"]["transformer"]
        partial = (entry.get("cond_only") or {}).get("transformer", [])
        assert 0 in full and len(full) + 0.5 * len(partial) == entry["budget"]
        assert entry["search"] == "measured" and entry["forecast"]["kind"] in ("newton", "cfg")
        assert entry["error"]["holdout_latent_rel_l1"] >= 0
        if entry["forecast"]["kind"] == "newton":
            assert entry["forecast"]["target"] in ("output", "residual")
        with cr.apply(pipe, config, budget=entry["budget"]) as handle:
            cached = _latents(pipe)
            stats = handle.stats()
        assert stats["computed"] == len(full) and stats["partial"] == len(partial)  # batched CFG: one stream
        assert stats["compute_fraction"] == pytest.approx(entry["budget"] / STEPS)
        assert not torch.equal(cached, reference) and torch.isfinite(cached).all()
    assert torch.equal(_latents(pipe), reference)  # the hooks are gone: plain runs again


def test_schedule_for_another_step_count_is_refused_in_one_line(fitted):
    import calib.runtime as cr
    from calib.models.digits import load_pipeline

    pipe = load_pipeline()
    with cr.apply(pipe, cr.load(fitted / "s.json")):
        with pytest.raises(cr.StepCountError) as info:
            _latents(pipe, steps=STEPS + 2)
    message = str(info.value)
    assert "\n" not in message and str(STEPS) in message and str(STEPS + 2) in message, message


def test_a_rerun_measures_nothing_twice_and_shards_add_up(fitted, capsys):
    log = json.loads((fitted / "s.search.json").read_text())
    measured = len(log["entries"])
    assert measured > 0 and all(v >= 0 for v in log["entries"].values())
    before = (fitted / "s.json").read_bytes()
    capsys.readouterr()
    assert _run(fitted, "fit", "t.h5", "--method", "schedule", *SEARCH, "--out", "s.json") == 0
    out = capsys.readouterr().out
    assert f"{measured} measurements already in s.search.json" in out, out
    assert len(json.loads((fitted / "s.search.json").read_text())["entries"]) == measured  # nothing new measured
    rerun = json.loads((fitted / "s.json").read_bytes())["schedules"]
    assert all(entry["error"].pop("generations_measured") == 0 for entry in rerun)
    first = json.loads(before)["schedules"]
    assert all(entry["error"].pop("generations_measured") > 0 for entry in first)
    assert rerun == first  # the same path through the same measurements

    # a cluster job array: each shard searches its budgets; the run without --shard reads them all
    assert _run(fitted, "fit", "t.h5", "--method", "schedule", *SEARCH, "--out", "s2.json", "--shard", "0/2") == 0
    out = capsys.readouterr().out
    assert "shard 0/2" in out and (fitted / "s2.search.rank0-of-2.json").exists() and not (fitted / "s2.json").exists()
    assert _run(fitted, "fit", "t.h5", "--method", "schedule", *SEARCH, "--out", "s2.json", "--shard", "1/2") == 0
    shards = sum(len(json.loads((fitted / f"s2.search.rank{i}-of-2.json").read_text())["entries"]) for i in (0, 1))
    capsys.readouterr()
    assert _run(fitted, "fit", "t.h5", "--method", "schedule", *SEARCH, "--out", "s2.json") == 0
    assert f"{shards} measurements already" in capsys.readouterr().out
    sharded = json.loads((fitted / "s2.json").read_text())["schedules"]
    assert all(entry["error"].pop("generations_measured") == 0 for entry in sharded) and sharded == first

    # other settings are another search: refused with one line, never mixed in
    assert _run(fitted, "fit", "t.h5", "--method", "schedule", "--fractions", "0.5", "--out", "s2.json") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "--overwrite" in err[0], err


def test_tune_picks_the_budget(fitted, capsys):
    import shutil

    path = fitted / "tuned.json"
    shutil.copy(fitted / "s.json", path)
    assert _run(fitted, "tune", "--coeffs", str(path), "--speedup", "2.5", "--write") == 0
    assert json.loads(path.read_text())["recommended"]["budget"] == 2  # the largest budget with 6 / B >= 2.5
    assert "budget 2" in capsys.readouterr().out


def test_the_cache_dit_export_writes_whole_step_masks_and_refuses_cond_only_steps(fitted, capsys):
    assert _run(fitted, "fit", "t.h5", "--method", "schedule", "--fractions", "0.5", "--forecast-targets",
                "output", "--forecast-order", "1", "--search-evals", "2", "--no-cond-only", *NO_BAR, "--out",
                "whole.json") == 0
    doc = json.loads((fitted / "whole.json").read_text())
    entry = doc["schedules"][0]
    assert entry["budget"] == 3 and "cond_only" not in entry and entry["forecast"]["kind"] == "newton"
    capsys.readouterr()
    assert _run(fitted, "export", "whole.json", "--format", "cache-dit") == 0
    exported = yaml.safe_load(capsys.readouterr().out)  # cache-dit's own config file (cache_dit.load_configs)
    config = exported["cache_config"]
    assert config["steps_computation_mask"] == [1 if s in entry["components"]["transformer"] else 0
                                                for s in range(STEPS)]
    assert config["steps_computation_policy"] == "static" and config["enable_separate_cfg"] is False
    assert config["taylorseer_order"] == entry["forecast"]["order"] == 1
    assert _run(fitted, "export", "whole.json", "--format", "cache-dit", "--budget", "99") == 2
    assert "no schedule for budget 99" in capsys.readouterr().err

    doc["schedules"][0]["cond_only"] = {"transformer": [s for s in range(STEPS)
                                                        if s not in entry["components"]["transformer"]][:2]}
    doc["schedules"][0]["budget"] = 4
    newton = {"kind": "newton", "order": 1, "variable": "step", "target": "output"}
    doc["schedules"][0]["forecast"] = {"kind": "cfg", "target": "output", "batch_order": ["uncond", "cond"],
                                       "cond": newton, "diff": newton}
    doc["recommended"]["budget"] = 4
    (fitted / "halves.json").write_text(json.dumps(doc))
    assert _run(fitted, "export", "halves.json", "--format", "cache-dit") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "conditional branch only" in err[0] and "--no-cond-only" in err[0], err


def test_frontier_runs_the_schedule_and_cache_dit_rows(fitted):
    """The schedule row applies the file's budgets (a cond-only step counts half); cache-dit's DBCache pays its first
    block on cached steps, so its compute share is above its fraction of full forwards; a row that cannot run says
    why."""
    import torch

    import calib.runtime as cr
    from calib.evaluate.frontier import run_frontier
    from calib.models.digits import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_pipeline()
        result = run_frontier(pipe, None, None, ["a handwritten 3", "a handwritten 5"], (5,), steps=STEPS,
                              guidance=3.0, rows=("cache-dit", "calib-schedule", "calib-forecast"),
                              schedule_config=cr.load(fitted / "s.json"), echo=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((fitted / "s.json").read_text())
    schedule = result["methods"]["calib-schedule"]["points"]
    assert sorted(p["setting"]["budget"] for p in schedule) == sorted(s["budget"] for s in doc["schedules"])
    assert all(p["fraction"] == pytest.approx(p["setting"]["budget"] / STEPS) for p in schedule)
    dbcache = result["methods"]["cache-dit"]["points"]
    assert any(p["fraction"] < 1 for p in dbcache)
    assert all(p["compute"] >= p["fraction"] for p in dbcache)
    assert "needs coefficients" in result["not_applicable"]["calib-forecast"]
    assert "matched on the compute share" in result["table"]


def test_fit_auto_keeps_the_better_of_gate_and_schedule_and_says_why(fitted, capsys):
    capsys.readouterr()
    assert _run(fitted, "fit", "t.h5", "--method", "auto", "--fractions", "0.5", "--forecast-targets", "output",
                "--forecast-order", "1", "--search-evals", "3", *NO_BAR, "--out", "auto.json") == 0
    out = capsys.readouterr().out
    doc = json.loads((fitted / "auto.json").read_text())
    verdict = doc["calibration"]["auto"]
    gate, schedule = verdict["gate"]["holdout_latent_rel_l1"], verdict["schedule"]["holdout_latent_rel_l1"]
    assert verdict["kept"] == ("schedule" if schedule <= gate else "gate")
    assert doc["method"] == ("schedule" if verdict["kept"] == "schedule" else "teacache")
    assert verdict["gate"]["compute_fraction"] <= 0.5 + 1e-9 and verdict["schedule"]["compute_fraction"] <= 0.5
    assert verdict["why"] in out and "kept" in verdict["why"]
    assert (fitted / "auto.gate.json").exists() and (fitted / "auto.schedule.json").exists()
    # each candidate file is what was measured: the gate runs the search's forecast at the compared threshold
    gate_doc = json.loads((fitted / "auto.gate.json").read_text())
    assert all(comp["forecast"] == verdict["gate"]["forecast"] for comp in gate_doc["components"].values())
    assert gate_doc["thresholds"]["recommended"] == pytest.approx(verdict["gate"]["threshold"])
    schedule_doc = json.loads((fitted / "auto.schedule.json").read_text())
    assert schedule_doc["recommended"]["budget"] == verdict["schedule"]["budget"]


# ---------------------------------------------------------------------------------------------------------------
# the model a schedule or auto fit regenerates with: never code or a download named by the trace file
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source, refused", [
    ("os:abort", "never runs code or downloads a model a file names"),
    ("evilsrc:pwn", "never runs code or downloads a model a file names"),
    ("someone/some-model", "never runs code or downloads a model a file names"),
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


def test_search_shards_are_found_by_escaped_name_only(tmp_path):
    """``--out '[ab].json'`` reads and clears its own shard files, never those of a.json or b.json."""
    from calib.store.search_log import SearchLog

    key = {"budgets": [3]}
    mine, other = SearchLog(tmp_path / "[ab].json", (0, 2)), SearchLog(tmp_path / "a.json", (0, 2))
    mine.write(key, {"measure|0,2|output-newton1": 0.5})
    other.write(key, {"measure|0,2|output-newton1": 0.25})
    (tmp_path / "a.search.rank1-of-2.json.bak").write_text("{}")
    unsharded = SearchLog(tmp_path / "[ab].json")
    assert unsharded.shard_files() == [mine.path]
    assert unsharded.read(key) == {"measure|0,2|output-newton1": 0.5}
    unsharded.clear()
    assert not mine.path.exists() and other.path.exists()
    with pytest.raises(Exception, match="other settings"):
        other.read({"budgets": [4]})
