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
