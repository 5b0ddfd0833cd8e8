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


def test_frontier_benchmark_runs_a_few_step_model_and_shows_the_no_cache_row(tmp_path):
    """A tiny few-step frontier: 4 steps, one peer; under a bar no skip keeps, calib auto's row is the file as it is
    (every step computed, error 0) and the table says why."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--model", "builtin:digits", "--steps", "4",
         "--methods", "calib-auto,uniform", "--calib-seeds", "0", "--seeds", "100", "--search-evals", "2",
         "--max-error", "0.0001", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("| calib auto"))
    assert row.count("no cache: 100.0% (100.0%) | 0.0000") == 3  # at each of the three targets
    assert "no step can be skipped below 0.0001 latent rel-L1 at 4 steps" in out.stdout
    assert any(line.startswith("| uniform") for line in out.stdout.splitlines())
    assert (tmp_path / "digits.json").exists()
