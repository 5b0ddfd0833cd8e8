"""Calibrations where users look (issue 23 item 4): the files calib ships load by name, from a checkout and from a
wheel installed in a fresh virtual environment; a calibration beside a model (``<model folder>/calib/<name>.json``)
loads from the folder and from a Hub repo in a local Hugging Face cache, offline. Nothing here touches the network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import calib.runtime as cr
from calib.runtime import artifacts

REPO = Path(__file__).resolve().parents[2]


def test_shipped_names_are_the_published_and_built_in_files():
    files = artifacts.shipped()
    published = sorted(p.stem for p in (REPO / "coeffs" / "published").glob("*.json"))
    assert published and set(published) <= set(files)
    assert {"digits", "wan-digits"} <= set(files)
    assert set(files) == set(published) | {"digits", "wan-digits"}
    config = cr.load("teacache-flux1-dev")
    assert Path(config.path) == REPO / "coeffs" / "published" / "teacache-flux1-dev.json"
    assert list(config.components["transformer"].coefficients) == json.loads(Path(config.path).read_text())[
        "components"]["transformer"]["coefficients"]
    assert cr.load("builtin:digits").path == cr.load("digits").path == str(REPO / "coeffs" / "digits.json")


def test_unknown_names_and_missing_paths_are_one_line(tmp_path):
    for source, start in (("no-such-calibration", "no-such-calibration: no such file, and calib ships no calibration"),
                          ("missing.json", "missing.json: no such file"),
                          ("coeffs/missing.json", "coeffs/missing.json: no such file"),
                          (tmp_path / "digits", f"{tmp_path / 'digits'}: no such file")):  # a Path is a path
        with pytest.raises(cr.CoefficientFileError) as info:
            cr.load(source)
        message = str(info.value)
        assert message.startswith(start) and "\n" not in message, message
    assert "teacache-flux1-dev" in str(pytest.raises(cr.CoefficientFileError, cr.load, "nope").value)


def _model_folder(root: Path, *names: str) -> Path:
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    (root / "calib").mkdir()
    for name in names:
        shutil.copyfile(REPO / "coeffs" / "digits.json", root / "calib" / f"{name}.json")
    return root


def test_a_calibration_beside_its_model_loads_from_the_folder(tmp_path):
    folder = _model_folder(tmp_path / "model", "28steps")
    assert cr.load(str(folder)).path == str(folder / "calib" / "28steps.json")
    assert cr.load(folder).path == str(folder / "calib" / "28steps.json")  # a Path to a folder too
    shutil.copyfile(folder / "calib" / "28steps.json", folder / "calib" / "50steps.json")
    with pytest.raises(cr.CoefficientFileError) as info:
        cr.load(str(folder))
    assert str(info.value) == (f"{folder}: holds 2 calibrations; load one of '{folder}/calib/28steps.json', "
                               f"'{folder}/calib/50steps.json'")
    assert cr.load(str(folder / "calib" / "50steps.json")).path == str(folder / "calib" / "50steps.json")
    with pytest.raises(cr.CoefficientFileError, match="is a directory with no calib/"):
        cr.load(str(tmp_path / "model" / "transformer"))


def test_cr_apply_takes_a_name(tmp_path):
    from calib.models import digits

    pipe = digits.load_pipeline()
    handle = cr.apply(pipe, "digits")
    try:
        assert handle.config.path == str(REPO / "coeffs" / "digits.json")
    finally:
        handle.remove()
    folder = _model_folder(tmp_path / "model", "mine")
    handle = cr.apply(pipe, str(folder), threshold=0.0)
    try:
        assert handle.config.path == str(folder / "calib" / "mine.json")
    finally:
        handle.remove()


HUB_SCRIPT = r"""
import json, sys
import calib.runtime as cr
out = {}
for source in sys.argv[1:]:
    try:
        out[source] = cr.load(source).path
    except cr.CoefficientFileError as exc:
        out[source] = "error: " + str(exc)
print(json.dumps(out))
"""


def test_a_hub_repo_loads_from_the_local_cache_offline(tmp_path):
    """A Hub repo's calib/*.json, from a Hugging Face cache built here (the layout huggingface_hub writes:
    refs/main -> a commit, snapshots/<commit>/...), with HF_HUB_OFFLINE=1: no request is made."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, names in (("acme/flux-calibrated", ["28steps"]), ("acme/two", ["a", "b"])):
        base = cache / f"models--{repo.replace('/', '--')}"
        (base / "refs").mkdir(parents=True)
        (base / "refs" / "main").write_text(commit)
        _model_folder(base / "snapshots" / commit, *names)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    sources = ["acme/flux-calibrated", "acme/two", "acme/two/calib/b.json", "acme/not-cached"]
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, *sources], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    snapshot = cache / "models--acme--flux-calibrated" / "snapshots" / commit
    assert Path(got["acme/flux-calibrated"]).resolve() == (snapshot / "calib" / "28steps.json").resolve()
    assert got["acme/two"].startswith("error: acme/two: holds 2 calibrations; load one of ")
    assert "'acme/two/calib/a.json'" in got["acme/two"]
    assert Path(got["acme/two/calib/b.json"]).name == "b.json"
    assert got["acme/not-cached"].startswith("error: acme/not-cached: no such file, nor a Hub repo calib can read")


@pytest.mark.slow
def test_the_wheel_ships_the_calibrations_and_they_load_by_name(tmp_path):
    """``pip wheel`` of the project, installed with --no-deps into a fresh venv (system site packages give it torch),
    loads every shipped file by name from a folder outside the repository."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("calib", "coeffs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.demo.png",
                                                                                  "*.search*.json", "shipped"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copyfile(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), "-q"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("calib-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    names = sorted(artifacts.shipped())
    script = ("import json, sys, calib, calib.runtime as cr\n"
              "from calib.runtime import artifacts\n"
              "print(json.dumps({'calib': calib.__file__, 'names': sorted(artifacts.shipped()),\n"
              "                  'loaded': {n: cr.load(n).path for n in sys.argv[1:]}}))\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([str(python), "-c", script, *names], env=env, cwd=elsewhere, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    package = Path(got["calib"]).parent
    assert package.is_relative_to(venv) and got["names"] == names
    for name, path in got["loaded"].items():
        assert Path(path).is_relative_to(package / "shipped")
        assert Path(path).read_bytes() == artifacts.shipped()[name].read_bytes()
