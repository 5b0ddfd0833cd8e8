"""The schedule and auto fits regenerate exactly the call the user traced: on a real FLUX folder with true CFG, a
negative prompt, a non-default size and bf16, every generation the search makes is that call (asserted on the
pipeline class's own ``__call__``), and a trace set mixing settings is refused in one line."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from cli_runner import run_cli

CALL = {"height": 32, "width": 32, "negative_prompt": "bad", "true_cfg_scale": 4.0}
STEPS = 6
SEARCH = ("--fractions", "0.5", "--forecast-targets", "output", "--forecast-order", "1", "--search-evals", "1")


@pytest.fixture(scope="module")
def traced(real_pipeline_folder, tmp_path_factory):
    folder = real_pipeline_folder("flux")
    work = tmp_path_factory.mktemp("served")
    (work / "p.txt").write_text("a red fox in snow\ntwo boats at dawn\na lighthouse at night\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_cli(["trace", "--model", folder, "--prompts", "p.txt", "--steps", STEPS, "--seeds", "0",
                                "--guidance", "3.5", "--height", "32", "--width", "32", "--negative-prompt", "bad",
                                "--true-cfg-scale", "4", "--dtype", "bfloat16", "--device", "cpu", "--out", "t.h5"],
                               work)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err[-3000:]
    return folder, work


@pytest.fixture
def recorded_calls(monkeypatch):
    """Every FluxPipeline call made in the test: its keyword arguments and the transformer's dtype."""
    from diffusers import FluxPipeline

    calls = []
    original = FluxPipeline.__call__

    def observed(self, *args, **kwargs):
        calls.append({**kwargs, "dtype": self.transformer.dtype})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FluxPipeline, "__call__", observed)
    return calls


def _assert_served(calls):
    assert calls
    for call in calls:
        assert call["dtype"] == torch.bfloat16
        assert call["num_inference_steps"] == STEPS and call["guidance_scale"] == pytest.approx(3.5)
        for key, value in CALL.items():
            assert call.get(key) == value, (key, call.get(key))


@pytest.mark.parametrize("method", ["schedule", "auto"])
def test_the_fit_regenerates_exactly_the_traced_call(traced, recorded_calls, method):
    folder, work = traced
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = run_cli(["fit", "t.h5", "--method", method, "--model", folder, *SEARCH,
                                  "--out", f"{method}.json"], work)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err[-3000:]
    _assert_served(recorded_calls)
    assert "--dtype bfloat16" in out and "--true-cfg-scale 4" in out  # and it says which call it measures
    # its long stages show progress on stderr, also when stderr is not a terminal
    assert re.search(r"schedule search: +\d+ measurement", err), err[-3000:]
    if method == "auto":
        assert re.search(r"gate runs: +\d+ run", err), err[-3000:]


def test_a_trace_set_of_two_calls_is_refused_in_one_line(traced, recorded_calls):
    folder, work = traced
    shutil.copy(work / "t.h5", work / "a.h5")
    code, _, err = run_cli(["trace", "--model", folder, "--prompts", "p.txt", "--steps", STEPS, "--seeds", "0",
                            "--guidance", "3.5", "--height", "16", "--width", "16", "--device", "cpu", "--out",
                            "b.h5"], work)
    assert code == 0, err[-3000:]
    recorded_calls.clear()
    code, _, err = run_cli(["fit", "a.h5", "b.h5", "--method", "schedule", "--model", folder, *SEARCH,
                            "--out", "mixed.json"], work)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("calib: error:"), err
    assert recorded_calls == []  # refused before any generation


def test_check_runs_the_traced_call(traced, recorded_calls):
    """calib check on a file fitted from the true-CFG 32x32 bf16 trace runs exactly that call (the file's recorded
    call, nothing given but the model and prompts), and says so: no call difference."""
    import json

    folder, work = traced
    code, _, err = run_cli(["fit", "t.h5", "--degree", "1", "--bootstrap", "0", "--no-plot", "--out", "c.json"], work)
    assert code == 0, err[-3000:]
    recorded_calls.clear()
    code, out, err = run_cli(["check", "c.json", "--model", folder, "--prompts", "p.txt", "--generations", "2",
                              "--device", "cpu", "--json"], work)
    result = json.loads(out)
    assert code == result["exit_code"] and result["verdict"] in ("holds", "retune", "refit"), err[-3000:]
    assert result["call_difference"] == []
    _assert_served(recorded_calls)
    assert not (work / "traces").exists()  # check traces in memory
