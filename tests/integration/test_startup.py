"""Commands that need no model start without torch (calib.runtime is imported lazily, PEP 562): a JSON or poly1d
export of a TeaCache file, refusals (a format the file does not take, a missing file, a file that is not JSON), the
help. What they take is measured by benchmarks/startup.py and quoted in docs/architecture.md; here, only that torch is
never imported on the way and that each ends as it should."""

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


@pytest.mark.parametrize("argv, code, said", [
    (["--help"], 0, None),
    (["fit", "--help"], 0, None),
    (["export", "coeffs/digits.json", "--format", "poly1d"], 0, None),
    (["export", "coeffs/digits.json", "--format", "json"], 0, None),
    # refused: a TeaCache file is no step schedule
    (["export", "coeffs/digits.json", "--format", "cache-dit"], 2, "calib: error:"),
    (["export", "{tmp}/missing.json", "--format", "json"], 2, "calib: error:"),
    (["export", "{tmp}/bad.json", "--format", "poly1d"], 2, "calib: error:"),
])
def test_a_command_that_needs_no_model_never_imports_torch(argv, code, said, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    argv = [a.format(tmp=tmp_path) for a in argv]
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == f"NO-TORCH {code}", out.stderr[-2000:]
    if said is not None:  # a refusal is one line, no traceback
        assert len(lines) == 2 and lines[0].startswith(said), out.stderr[-2000:]


def test_the_runtime_api_is_all_there_when_imported_lazily():
    import calib.runtime as cr

    for name in cr.__all__:
        assert getattr(cr, name) is not None, name
    assert set(cr.__all__) <= set(dir(cr))
    with pytest.raises(AttributeError):
        cr.no_such_name  # noqa: B018
