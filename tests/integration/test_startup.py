"""Commands that need no model start without torch (calib.runtime is imported lazily, PEP 562): a JSON or poly1d
export of a TeaCache file, a refusal, the help. What they cost is measured in docs/evaluation.md; here, only that
torch is never imported on the way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = ("import runpy, sys\n"
         "sys.argv = ['calib'] + sys.argv[1:]\n"
         "try:\n"
         "    runpy.run_module('calib', run_name='__main__')\n"
         "except SystemExit as exc:\n"
         "    code = exc.code\n"
         "else:\n"
         "    code = 0\n"
         "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code, file=sys.stderr)\n")


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["fit", "--help"],
    ["export", "coeffs/digits.json", "--format", "poly1d"],
    ["export", "coeffs/digits.json", "--format", "json"],
    ["export", "coeffs/digits.json", "--format", "cache-dit"],  # refused: a TeaCache file is no step schedule
])
def test_a_command_that_needs_no_model_never_imports_torch(argv):
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("NO-TORCH"), out.stderr[-2000:]


def test_the_runtime_api_is_all_there_when_imported_lazily():
    import calib.runtime as cr

    for name in cr.__all__:
        assert getattr(cr, name) is not None, name
    assert set(cr.__all__) <= set(dir(cr))
    with pytest.raises(AttributeError):
        cr.no_such_name  # noqa: B018
