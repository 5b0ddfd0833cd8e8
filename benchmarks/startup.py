"""How long the commands that need no model take to start and finish, and that none of them imports torch.

    python benchmarks/startup.py                 # 10 runs of each, medians
    python benchmarks/startup.py --repeats 3

Each command runs as a user runs it (``python -m calib ...`` in a fresh interpreter, from the repository root) and is
timed from the process start to its exit, so the figures include the interpreter's own start; ``python -c pass`` and
``python -c "import torch"`` are timed the same way for scale. docs/architecture.md quotes the result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import runpy, sys\n"
         "sys.argv = ['calib'] + sys.argv[1:]\n"
         "try:\n"
         "    runpy.run_module('calib', run_name='__main__')\n"
         "except SystemExit:\n"
         "    pass\n"
         "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")


def commands(bad_file: str) -> dict[str, list[str]]:
    return {
        "calib --help": ["--help"],
        "calib fit --help": ["fit", "--help"],
        "calib export coeffs/digits.json --format poly1d": ["export", "coeffs/digits.json", "--format", "poly1d"],
        "calib export coeffs/digits.json --format json": ["export", "coeffs/digits.json", "--format", "json"],
        "calib export <not JSON> --format json (refused)": ["export", bad_file, "--format", "json"],
    }


def seconds(argv: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    took = time.perf_counter() - start
    return took, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.json"
        bad.write_text("{not json")
        rows = {"python -c pass": ([sys.executable, "-c", "pass"], None),
                "python -c 'import torch'": ([sys.executable, "-c", "import torch"], None)}
        rows.update({name: ([sys.executable, "-c", PROBE, *argv], "probe")
                     for name, argv in commands(str(bad)).items()})
        times = {name: [] for name in rows}
        imported = {}
        for _ in range(args.repeats):  # interleaved, so load on the machine hits every command alike
            for name, (argv, kind) in rows.items():
                took, last = seconds(argv, env)
                times[name].append(took)
                if kind:
                    imported[name] = last
    width = max(map(len, rows))
    print(f"median of {args.repeats} runs each (wall seconds, process start to exit), {os.cpu_count()} CPUs")
    for name in rows:
        note = f"  ({'imports torch' if imported[name] == 'TORCH' else 'no torch'})" if name in imported else ""
        print(f"  {name:<{width}}  {statistics.median(times[name]):6.3f} s{note}")


if __name__ == "__main__":
    main()
