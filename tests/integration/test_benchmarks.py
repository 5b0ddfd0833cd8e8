"""The benchmark scripts run (tiny settings; they print ratios, which are not asserted: tests never assert timing)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_overhead_benchmark_runs_and_prints_the_tracer_fraction():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--repeats", "1", "--steps", "3", "--no-flux"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    for model in ("built-in digits model", "built-in wan-digits video model"):
        section = out.stdout.split(model, 1)[1].split("\n==", 1)[0]
        for mode in ("plain", "traced", "runtime thr 0", "runtime thr 1e-9"):
            assert f"  {mode} " in section, (model, mode)
        assert "% per call" in section


def test_startup_benchmark_runs_and_no_command_it_times_imports_torch():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--repeats", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.strip().startswith("calib ")]
    assert len(rows) == 5 and all(row.endswith("(no torch)") for row in rows), out.stdout


def test_frontier_benchmark_runs_the_few_step_student_and_states_calibs_verdicts(tmp_path):
    """A tiny frontier of the distilled 4-step student (one peer, short searches): the TeaCache fit's no-cache verdict
    and the budget auto's file recommends within the quality bar are stated under the table, next to the peer."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--model", "builtin:digits-4step", "--steps", "4",
         "--guidance", "1", "--methods", "calib,calib-auto,uniform", "--calib-seeds", "0", "--seeds", "100",
         "--search-evals", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("| calib auto") for line in lines)
    assert any(line.startswith("| uniform") for line in lines)
    assert any(line.startswith("* calib (calibrated rescaler") and "at 4 steps" in line
               and line.endswith("no cache recommended (the file computes every step)") for line in lines)
    assert any(line.startswith("* calib auto") and "the file recommends budget" in line for line in lines)
    assert (tmp_path / "digits-4step.json").exists()


def test_validity_benchmark_measures_the_file_and_a_refit_and_compares_check(tmp_path):
    """The transfer table's smallest run: the shipped digits file at its calibrated call and at 4 steps on the
    distilled student; each row holds what calib check said (run as a user runs it) and the measured verdict."""
    import json

    out_json = tmp_path / "validity.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "validity.py"), "--cases", "base,fewstep-4", "--seeds", "2000",
         "--calib-seeds", "0,1", "--generations", "2", "--cache", str(tmp_path / "cache"), "--json", str(out_json)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    results = {r["case"]: r for r in json.loads(out_json.read_text())["results"]}
    assert results["base"]["check"]["verdict"] in ("holds", "retune", "refit")
    assert results["base"]["agrees"] == (results["base"]["check"]["verdict"] == results["base"]["measured"]["verdict"])
    few = results["fewstep-4"]
    # at 4 steps the 30-step file's gate computes every step; no skip keeps the quality bar, and check says so
    assert few["file"]["fraction"] == 1.0 and few["measured"]["verdict"] == "refit"
    assert few["check"]["verdict"] == "refit" and few["check"]["one_skip"]["no_cache_recommended"]
    assert "| base |" in out.stdout and "calib check agrees with the measurement in" in out.stdout
