"""``calib ...`` run in-process as the console script runs it (``calib.cli.main``), for the tests that drive the CLI
(test_reliability, test_faults, test_pipeline_args)."""

from __future__ import annotations

import io
import os
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path


def run_cli(argv: list[str], work: Path, *, warnings_filter: str = "default") -> tuple[int, str, str]:
    """``calib <argv>`` in ``work``; (exit status, stdout, stderr). Warnings reach stderr the way the console script
    shows them; ``warnings_filter`` "always" repeats one raised twice."""
    from calib.cli import main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter(warnings_filter)
            code = main([str(a) for a in argv])
    finally:
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()
