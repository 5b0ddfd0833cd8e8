"""The CLI as a user runs it: trace -> fit -> export -> demo on the built-in model, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import jsonschema
import numpy as np
import pytest

from calib.cli import main
from calib.coeffs.schema import schema

ROOT = Path(__file__).resolve().parents[2]


def run_calib(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "calib", *args], cwd=cwd, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One real trace + fit of the built-in model on the bundled prompts (10 prompts x 2 seeds)."""
    work = tmp_path_factory.mktemp("calib")
    trace = run_calib("trace", "--model", "builtin:digits", "--steps", "20", "--seeds", "0,1", cwd=work)
    assert trace.returncode == 0, trace.stderr
    fit = run_calib("fit", "traces/digits.h5", "--out", "coeffs/digits.json", cwd=work)
    assert fit.returncode == 0, fit.stderr
    return work, trace, fit


def test_trace_writes_the_documented_hdf5(workdir):
    work, trace, _ = workdir
    assert "traced 20 generations" in trace.stdout
    with h5py.File(work / "traces/digits.h5", "r") as f:
        assert f.attrs["schema_version"] == 1
        assert f.attrs["model_class"] == "FluxTransformer2DModel"
        assert f.attrs["model_source"] == "builtin:digits"
        assert str(f.attrs["model_config_hash"]).startswith("sha256:")
        assert f.attrs["scheduler"] == "FlowMatchEulerDiscreteScheduler"
        groups = list(f["trajectories"].values())
        assert len(groups) == 40  # 10 prompts x 2 seeds x (cond, uncond)
        assert {g.attrs["stream"] for g in groups} == {"cond", "uncond"}
        g = groups[0]
        assert g.attrs["steps"] == 20 and g.attrs["guidance"] == 3.0 and list(g.attrs["resolution"]) == [8, 8]
        for name in ("timesteps", "sigmas", "input_rel_l1", "output_rel_l1", "residual_rel_l1"):
            assert g[name].shape == (20,)
        assert g["block_rel_l1"].shape == (20, 6)
        x = g["input_rel_l1"][()]
        assert np.isnan(x[0]) and np.all(np.isfinite(x[1:])) and np.all(x[1:] > 0)
        assert np.all(np.diff(g["timesteps"][()]) < 0)


def test_fit_writes_valid_json_and_png(workdir):
    work, _, fit = workdir
    doc = json.loads((work / "coeffs/digits.json").read_text())
    jsonschema.validate(doc, schema())
    comp = doc["components"]["transformer"]
    assert comp["metrics"]["r2"] >= 0.8
    # --degree auto (the default) picks the degree by held-out error; the kept one is recorded with its reason.
    assert 1 <= comp["degree"] == len(comp["coefficients"]) - 1 <= 6 and comp["fit"]["degree_selection"]["mode"] == "auto"
    assert doc["calibration"]["num_prompts"] == 10 and doc["calibration"]["steps"] == [20]
    assert doc["thresholds"]["recommended"] > 0
    assert (work / "coeffs/digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "R²" in fit.stdout and "CV MAE" in fit.stdout


def test_export_poly1d_is_paste_ready(workdir):
    work, _, _ = workdir
    out = run_calib("export", "coeffs/digits.json", "--format", "poly1d", cwd=work)
    assert out.returncode == 0, out.stderr
    namespace = {"np": np}
    exec(out.stdout, namespace)  # noqa: S102 - the point is that it runs as pasted
    doc = json.loads((work / "coeffs/digits.json").read_text())
    assert namespace["coefficients"] == doc["components"]["transformer"]["coefficients"]
    assert namespace["rel_l1_thresh"] == doc["thresholds"]["recommended"]


def test_trace_resumes_without_duplicates(workdir):
    work, _, _ = workdir
    again = run_calib("trace", "--steps", "20", "--seeds", "0,1", cwd=work)
    assert again.returncode == 0, again.stderr
    assert "20 of 20 generations already traced" in again.stdout
    with h5py.File(work / "traces/digits.h5", "r") as f:
        assert len(f["trajectories"]) == 40


def test_help_explains_every_command():
    for args in ([], ["trace"], ["fit"], ["export"], ["demo"]):
        out = subprocess.run([sys.executable, "-m", "calib", *args, "--help"], capture_output=True, text=True)
        assert out.returncode == 0
        assert "Usage:" in out.stdout and len(out.stdout.splitlines()) > 5


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("calib: error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_missing_prompts_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["trace", "--prompts", "nope.txt"]) == 2
    assert "nope.txt: prompts file not found" in _error_line(capsys)
    assert not (tmp_path / "traces").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "no prompts in it"),
        (b"\n# only a comment\n\n", "no prompts in it"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "looks binary"),
        (b"caf\xe9 7\n", "not UTF-8"),
    ],
)
def test_unusable_prompts_file(tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_bytes(content)
    assert main(["trace", "--prompts", "p.txt"]) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "traces").exists()


def test_prompt_the_model_cannot_read(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    assert main(["trace", "--prompts", "p.txt", "--steps", "4", "--seeds", "0"]) == 2
    assert "cannot map prompt 'a photo of a cat' to one digit" in _error_line(capsys)


def test_fit_refuses_non_hdf5(tmp_path, capsys):
    bad = tmp_path / "t.h5"
    bad.write_text("not hdf5")
    assert main(["fit", str(bad), "--out", str(tmp_path / "c.json")]) == 2
    assert "not an HDF5 file" in _error_line(capsys)
    assert not (tmp_path / "c.json").exists()


def test_fit_refuses_missing_trace(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "none.h5"), "--out", str(tmp_path / "c.json")]) == 2
    assert "trace file not found" in _error_line(capsys)


def test_export_refuses_other_schema_version(workdir, tmp_path, capsys):
    work, _, _ = workdir
    doc = json.loads((work / "coeffs/digits.json").read_text())
    doc["schema_version"] = 2
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(doc))
    assert main(["export", str(path)]) == 2
    assert "version 2" in _error_line(capsys)


def test_unknown_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("7\n")
    assert main(["trace", "--model", "builtin:nope", "--prompts", "p.txt"]) == 2
    assert "no built-in model 'nope'" in _error_line(capsys)


def test_demo_main_job(tmp_path):
    """README's main command: trace, fit, export, cached generation, with its report."""
    out = run_calib("demo", "--steps", "30", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "measured speed-up" in text and "error vs uncached" in text and "legibility" in text
    computed = [line for line in text.splitlines() if "steps computed" in line][0]
    done, total = (int(v) for v in computed.split()[2:5:2])
    assert done <= total * 2 / 3  # at least a third of the steps skipped at the recommended threshold
    legible = [line for line in text.splitlines() if "legibility" in line][0]
    assert int(legible.split("reads ")[1].split("/")[0]) >= 9
    for name in ("traces/digits.h5", "coeffs/digits.json", "coeffs/digits.png", "coeffs/digits.demo.png"):
        assert (tmp_path / name).is_file(), name
    # Run in a checkout, the demo rewrites the shipped coeffs/digits.json: it must be the same measurement.
    made = json.loads((tmp_path / "coeffs/digits.json").read_text())
    shipped = json.loads((ROOT / "coeffs/digits.json").read_text())
    for doc in (made, shipped):
        doc["calibration"].pop("trace_files")
    for key in ("model", "indicator", "calibration"):
        assert made[key] == shipped[key], key
    assert made["thresholds"]["recommended"] == shipped["thresholds"]["recommended"]
    a, b = made["components"]["transformer"], shipped["components"]["transformer"]
    assert a["degree"] == b["degree"] and a["fit"]["constraint"] == b["fit"]["constraint"]
    assert a["domain"] == pytest.approx(b["domain"], rel=1e-6)
    grid = np.linspace(*b["domain"], 50)
    np.testing.assert_allclose(np.polyval(a["coefficients"], grid), np.polyval(b["coefficients"], grid), rtol=1e-4)
