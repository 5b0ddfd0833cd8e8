"""TeaCache's published coefficients shipped as data (coeffs/published/), and ``calib compare``."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import calib.runtime as cr
from calib.cli import main
from calib.report.compare import DEFAULT_DOMAIN, compare, plot_comparison
from calib.errors import CalibError
from calib.methods.registry import load_document, write_document
from shipped import shipped

REPO = Path(__file__).resolve().parents[2]
COEFFS = REPO / "coeffs"
PUBLISHED = COEFFS / "published"
SCRIPT = REPO / "scripts" / "make_published_coeffs.py"
FLUX_FILE = PUBLISHED / "teacache-flux1-dev.json"
FLUX = [498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

ALL_FILES = shipped(COEFFS.rglob("*.json"))  # not what `calib demo` leaves beside them (gitignored)
PUBLISHED_FILES = sorted(PUBLISHED.glob("*.json"))


def _script():
    spec = importlib.util.spec_from_file_location("make_published_coeffs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ids(paths):
    return [str(p.relative_to(COEFFS)) for p in paths]


# ---------------------------------------------------------------------------------------------------------------
# the shipped files
# ---------------------------------------------------------------------------------------------------------------
def test_published_files_exist():
    assert FLUX_FILE.is_file()
    assert len(PUBLISHED_FILES) >= 10


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_every_coefficient_file_loads(path):
    doc = load_document(path)
    config = cr.load(path)
    assert config.model_class == doc["model"]["class"]
    assert set(config.components) == set(doc["components"])


@pytest.mark.parametrize("path", PUBLISHED_FILES, ids=_ids(PUBLISHED_FILES))
def test_published_provenance(path):
    doc = load_document(path)
    prov = doc["provenance"]
    assert prov["source"] == "published"
    assert prov["repository"] == "ali-vilab/TeaCache"
    assert prov["path"] and not prov["path"].startswith("/")
    assert len(prov["commit"]) == 40 and int(prov["commit"], 16) >= 0
    assert prov["model_id"] == doc["model"]["source"]
    assert prov["notes"]
    assert "config_hash" not in doc["model"]  # unknown for published coefficients
    for comp in doc["components"].values():
        assert comp["domain"] is None
        assert comp["order"] == "highest_first"
    thresholds = doc.get("thresholds")
    if thresholds is not None:
        listed = [row["threshold"] for row in thresholds["table"]]
        assert thresholds["recommended"] is None or thresholds["recommended"] in listed


def test_flux_coefficients_are_the_published_ones():
    doc = load_document(FLUX_FILE)
    assert doc["model"] == {"class": "FluxTransformer2DModel", "source": "black-forest-labs/FLUX.1-dev"}
    comp = doc["components"]["transformer"]
    assert comp["coefficients"] == FLUX
    assert comp["degree"] == 4
    assert doc["calibration"]["steps"] == [28]
    assert doc["thresholds"]["recommended"] == 0.6
    assert {r["threshold"]: r["predicted_speedup"] for r in doc["thresholds"]["table"]} == {
        0.25: 1.5, 0.4: 1.8, 0.6: 2.0, 0.8: 2.25,
    }
    assert doc["provenance"]["path"] == "TeaCache4FLUX/teacache_flux.py"


def test_script_reproduces_the_files_byte_for_byte(tmp_path):
    written = _script().main(["--out", str(tmp_path)])
    assert sorted(p.name for p in written) == sorted(p.name for p in tmp_path.glob("*.json"))
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(p.name for p in PUBLISHED_FILES)
    for path in PUBLISHED_FILES:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_script_entries_have_distinct_names_and_cite_lines():
    module = _script()
    names = [e["name"] for e in module.ENTRIES]
    assert len(names) == len(set(names))
    for entry in module.ENTRIES:
        assert entry["line"] >= 1
        assert entry["path"]


# ---------------------------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------------------------
def _with_domain(tmp_path, name, domain, coefficients=None, components=None):
    doc = copy.deepcopy(load_document(FLUX_FILE))
    comp = doc["components"]["transformer"]
    comp["domain"] = domain
    if coefficients is not None:
        comp["coefficients"] = coefficients
        comp["degree"] = len(coefficients) - 1
    if components is not None:
        doc["components"] = {k: copy.deepcopy(comp) for k in components}
    return write_document(doc, tmp_path / name)


def test_compare_both_domains_unknown_uses_default():
    other = PUBLISHED / "teacache-hunyuanvideo.json"
    table = compare([FLUX_FILE, other], points=5)
    comp = table.component("transformer")
    assert comp.interval == DEFAULT_DOMAIN
    assert "default" in comp.note
    np.testing.assert_allclose(comp.x, np.linspace(0.0, 0.5, 5))
    np.testing.assert_allclose(comp.a, np.polyval(FLUX, comp.x))
    hy = load_document(other)["components"]["transformer"]["coefficients"]
    np.testing.assert_allclose(comp.b, np.polyval(hy, comp.x))
    assert comp.max_abs_diff == pytest.approx(np.max(np.abs(comp.a - comp.b)))
    assert comp.mean_abs_diff == pytest.approx(np.mean(np.abs(comp.a - comp.b)))
    assert any("different model classes" in n for n in table.notes)


def test_compare_same_coefficients_differ_by_zero():
    table = compare([FLUX_FILE, PUBLISHED / "teacache-tangoflux.json"])
    comp = table.component("transformer")
    assert len(comp.x) == 11
    assert comp.max_abs_diff == 0.0 and comp.mean_abs_diff == 0.0


def test_compare_one_known_domain(tmp_path):
    measured = _with_domain(tmp_path, "measured.json", [0.05, 0.35], [500.0, -285.0, 56.0, -3.9, 0.27])
    comp = compare([FLUX_FILE, measured], points=4).component("transformer")
    assert comp.interval == (0.05, 0.35)
    assert comp.assumed_a == (0.0, 0.35)
    assert "A's domain unknown" in comp.note


def test_compare_known_domains_intersection_and_union(tmp_path):
    a = _with_domain(tmp_path, "a.json", [0.0, 0.3])
    b = _with_domain(tmp_path, "b.json", [0.1, 0.4])
    assert compare([a, b]).component("transformer").interval == (0.1, 0.3)
    c = _with_domain(tmp_path, "c.json", [0.5, 0.6])
    comp = compare([a, c]).component("transformer")
    assert comp.interval == (0.0, 0.6)
    assert "do not overlap" in comp.note


def test_compare_only_common_components(tmp_path):
    a = _with_domain(tmp_path, "a.json", None, components=["transformer", "transformer_2"])
    table = compare([a, FLUX_FILE])
    assert [c.name for c in table.components] == ["transformer"]
    assert table.only_a == ["transformer_2"]
    assert "only in A" in table.format()


def test_compare_errors(tmp_path):
    with pytest.raises(CalibError, match="no such file"):
        compare([tmp_path / "missing.json", FLUX_FILE])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(CalibError, match="not JSON"):
        compare([bad, FLUX_FILE])
    other = _with_domain(tmp_path, "other.json", None, components=["transformer_2"])
    with pytest.raises(CalibError, match="no component in common"):
        compare([FLUX_FILE, other])
    with pytest.raises(CalibError, match="points"):
        compare([FLUX_FILE, FLUX_FILE], points=1)
    with pytest.raises(CalibError, match="exactly two"):
        compare([FLUX_FILE])


def test_plot_comparison_writes_png(tmp_path):
    measured = _with_domain(tmp_path, "measured.json", [0.05, 0.35], [500.0, -285.0, 56.0, -3.9, 0.27])
    out = plot_comparison(compare([FLUX_FILE, measured]), tmp_path / "plots" / "cmp.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


# ---------------------------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------------------------
def test_cli_compare_prints_table_and_writes_png(tmp_path, capsys):
    png = tmp_path / "cmp.png"
    other = PUBLISHED / "teacache-mochi-1-preview.json"
    code = main(["compare", str(FLUX_FILE), str(other), "--out", str(png), "--points", "6"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert "p_a(x)" in out and "p_b(x)" in out and "p_a - p_b" in out
    assert "max |p_a - p_b|" in out and "mean |p_a - p_b|" in out
    assert str(FLUX_FILE) in out and "teacache-mochi-1-preview.json" in out
    table_lines = [line for line in out.splitlines() if line.strip() and line.split()[0].replace(".", "").isdigit()]
    assert len(table_lines) == 6
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert f"wrote {png}" in out


def test_cli_compare_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    code = main(["compare", str(missing), str(FLUX_FILE)])
    captured = capsys.readouterr()
    assert code == 2
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1
    assert "no such file" in err_lines[0] and str(missing) in err_lines[0]


def test_cli_compare_invalid_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}), encoding="utf-8")
    code = main(["compare", str(FLUX_FILE), str(bad)])
    captured = capsys.readouterr()
    assert code == 2
    assert len(captured.err.strip().splitlines()) == 1
    assert "not a calib coefficient file" in captured.err


def test_cli_compare_no_common_component(tmp_path, capsys):
    other = _with_domain(tmp_path, "other.json", None, components=["transformer_2"])
    code = main(["compare", str(FLUX_FILE), str(other)])
    captured = capsys.readouterr()
    assert code == 2
    assert len(captured.err.strip().splitlines()) == 1
    assert "no component in common" in captured.err
