"""The version-1 coefficient document: calib.coeffs (schema, writer, loader) and calib.methods.registry.validate."""

from __future__ import annotations

import copy
import json
import math
import os
import types
from pathlib import Path

import numpy as np
import pytest

import calib
from calib.errors import CalibError
from calib.runtime.document import SCHEMA_VERSION
from calib.methods.teacache.components import build_document
from calib.methods.registry import load_document, validate as validate_document, write_document
from calib.coeffs.schema import schema
from calib._io import write_bytes as write_atomic_bytes
from calib.methods.teacache.fit import fit_all_components
from helpers.documents import FLUX, published_flux

REPO = Path(__file__).resolve().parents[2]


def make_trace_set(n_traj=6, steps=12, seed=0):
    rng = np.random.default_rng(seed)
    trajs = []
    for i in range(n_traj):
        x = rng.uniform(0.05, 0.35, steps - 1)
        y = np.poly1d(FLUX)(x) + rng.normal(0.0, 0.005, steps - 1)
        trajs.append(
            types.SimpleNamespace(
                component="transformer",
                stream="cond" if i % 2 == 0 else "uncond",
                input_rel_l1=np.r_[np.nan, x].astype(np.float32),
                output_rel_l1=np.r_[np.nan, y].astype(np.float32),
            )
        )
    settings = {
        "steps": [steps],
        "guidance": [3.0],
        "resolution": [(8, 8)],
        "streams": ["cond", "uncond"],
        "components": ["transformer"],
        "prompts": n_traj // 2,
        "seeds": 1,
    }
    return types.SimpleNamespace(
        model_info={
            "class": "FluxTransformer2DModel",
            "source": "builtin:digits",
            "config_hash": "sha256:0123",
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "adapter": "flux",
            "indicator": {"name": "modulated_input", "module": "transformer_blocks.0.norm1", "normalization": "none"},
        },
        trajectories=trajs,
        files=["traces/digits.h5"],
        attrs=[{} for _ in trajs],
        settings=lambda: dict(settings),
    )


@pytest.fixture(scope="module")
def doc():
    ts = make_trace_set()
    fits = fit_all_components(ts)
    return build_document(
        fits,
        ts,
        thresholds={"recommended": 0.3, "table": [{"threshold": 0.3, "compute_fraction": 0.55, "predicted_speedup": 1.8}]},
        created="2026-11-23T08:00:00Z",
    )


def _error(doc, source="f.json") -> str:
    with pytest.raises(CalibError) as exc:
        validate_document(doc, source=source)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --- schema ------------------------------------------------------------------------------------------------------
def test_schema_is_valid_draft_2020_12():
    import jsonschema

    s = schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(s)
    s["title"] = "changed"  # a fresh copy each time
    assert schema()["title"] != "changed"


def test_docs_schema_copy_is_identical():
    packaged = (REPO / "calib" / "schemas" / "coefficients.v1.schema.json").read_bytes()
    assert (REPO / "docs" / "coefficients.v1.schema.json").read_bytes() == packaged


# --- build / round trip ------------------------------------------------------------------------------------------
def test_build_document_contents(doc):
    assert doc["format"] == "calib.coefficients" and doc["schema_version"] == SCHEMA_VERSION == 1
    assert doc["method"] == "teacache" and doc["calib_version"] == calib.__version__
    assert doc["created"] == "2026-11-23T08:00:00Z"
    assert doc["model"] == {
        "class": "FluxTransformer2DModel",
        "source": "builtin:digits",
        "config_hash": "sha256:0123",
        "adapter": "flux",
    }
    assert doc["indicator"]["module"] == "transformer_blocks.0.norm1"
    cal = doc["calibration"]
    assert cal["steps"] == [12] and cal["guidance"] == [3.0] and cal["resolution"] == [[8, 8]]
    assert cal["num_prompts"] == 3 and cal["num_seeds"] == 1 and cal["num_trajectories"] == 6
    assert cal["scheduler"] == "FlowMatchEulerDiscreteScheduler" and cal["trace_files"] == ["traces/digits.h5"]
    comp = doc["components"]["transformer"]
    assert comp["order"] == "highest_first" and comp["degree"] == 4 == len(comp["coefficients"]) - 1
    assert all(type(c) is float for c in comp["coefficients"])
    assert comp["domain"][0] < comp["domain"][1]
    m = comp["metrics"]
    # 6 trajectories x 12 steps, less entry 0 (no previous step) and the last step (forced by the gate)
    assert m["points"] == 60 and m["trajectories"] == 6 and m["skipped_trajectories"] == 0 and m["cv_folds"] == 5
    assert m["r2"] > 0.99
    assert comp["fit"]["method"] == "least_squares" and comp["fit"]["streams"] == ["cond", "uncond"]
    excluded = comp["fit"]["excluded_steps"]
    assert excluded["rule"] == "forced_last" and excluded["points"] == 6 and "last step" in excluded["reason"]
    assert comp["fit"]["constraint"] in ("none", "nonnegative_nondecreasing") and comp["fit"]["reason"]
    assert doc["thresholds"]["recommended"] == 0.3


def test_nan_metrics_become_null():
    ts = make_trace_set(n_traj=1)  # one trajectory: no cross-validation
    d = build_document(fit_all_components(ts), ts)
    m = d["components"]["transformer"]["metrics"]
    assert m["cv_mae"] is None and m["cv_r2"] is None and m["cv_folds"] == 0
    assert d["created"].endswith("Z")


def test_infinite_threshold_values_become_null():
    ts = make_trace_set(n_traj=2)
    table = [{"threshold": 0.5, "compute_fraction": 0.0, "predicted_speedup": float("inf")}]
    d = build_document(fit_all_components(ts), ts, thresholds={"recommended": 0.5, "criterion": "x", "table": table})
    assert d["thresholds"]["table"][0]["predicted_speedup"] is None
    assert d["thresholds"]["criterion"] == "x"
    assert table[0]["predicted_speedup"] == float("inf")  # caller's dict untouched


def test_round_trip(doc, tmp_path):
    path = write_document(doc, tmp_path / "new" / "dir" / "coeffs.json")
    assert path == tmp_path / "new" / "dir" / "coeffs.json"
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n  "format": "calib.coefficients"') and text.endswith("}\n")
    loaded = load_document(path)
    assert loaded == doc
    assert np.poly1d(loaded["components"]["transformer"]["coefficients"])(0.2) == pytest.approx(
        np.poly1d(FLUX)(0.2), abs=0.02
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["coeffs.json"]


def test_published_coefficients_validate(tmp_path):
    d = published_flux()
    assert validate_document(d) is d
    assert load_document(write_document(d, tmp_path / "flux.json")) == d


def test_unknown_top_level_section_allowed(tmp_path):
    """A top-level section this calib does not know (a newer calib's) is allowed: the document validates, is written
    and read back with the section unchanged, and the runtime loads it as it loads the document without the section
    (keeping the section in its copy of the document)."""
    import dataclasses

    import calib.runtime as cr

    d = published_flux()
    d["future_section"] = {"anything": [1, 2]}
    assert validate_document(d) is d
    path = write_document(d, tmp_path / "future.json")
    assert json.loads(path.read_text())["future_section"] == {"anything": [1, 2]}
    assert load_document(path) == d
    loaded, without = cr.load(path), cr.parse(published_flux())
    assert loaded.document == d  # the runtime keeps the whole document, the section included
    assert dataclasses.replace(loaded, path=without.path, document=without.document) == without


# --- validation failures -----------------------------------------------------------------------------------------
def test_newer_schema_version_dedicated_message(doc):
    d = copy.deepcopy(doc)
    d["schema_version"] = 2
    assert _error(d, "coeffs/x.json") == (
        "coeffs/x.json: schema_version: this file is version 2; calib 0.1.0 reads version 1"
        " — upgrade calib to read it"
    )


@pytest.mark.parametrize("value, expect", [(0, "version 0 is not a known version"), ("1", "expected an integer")])
def test_other_bad_schema_versions(value, expect):
    d = published_flux()
    d["schema_version"] = value
    assert _error(d).startswith(f"f.json: schema_version: {expect}")


def test_not_a_coefficient_file():
    assert _error({"hello": 1}).startswith("f.json: format: not a calib coefficient file")
    assert _error([1, 2]) == "f.json: (root): expected a JSON object, got array"


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: d.pop("calib_version"), "f.json: calib_version: required field is missing"),
        (lambda d: d["model"].pop("class"), "f.json: model.class: required field is missing"),
        (lambda d: d["indicator"].pop("name"), "f.json: indicator.name: required field is missing"),
        (
            lambda d: d["components"]["transformer"].pop("domain"),
            "f.json: components.transformer.domain: required field is missing",
        ),
        (lambda d: d.update(components={}), "f.json: components: must not be empty"),
        (lambda d: d.update(method="fastercache"), "f.json: method: \"fastercache\" is not one of \"teacache\""),
        (
            lambda d: d["components"]["transformer"]["coefficients"].__setitem__(1, "x"),
            "f.json: components.transformer.coefficients[1]: expected number, got string \"x\"",
        ),
        (
            lambda d: d["components"]["transformer"].update(order="lowest_first"),
            "f.json: components.transformer.order: must be \"highest_first\"",
        ),
        (lambda d: d.update(created="yesterday"), "f.json: created: expected an RFC 3339 date-time"),
        (
            lambda d: d["calibration"].update(steps=[30.5]),
            "f.json: calibration.steps[0]: expected integer, got number",
        ),
        (
            lambda d: d["components"]["transformer"].update(domain=[0.1]),
            "f.json: components.transformer.domain: needs at least 2 item(s), got 1",
        ),
    ],
)
def test_schema_errors_have_path(mutate, expect):
    d = published_flux()
    d["components"]["transformer"]["coefficients"] = list(FLUX)
    mutate(d)
    assert _error(d).startswith(expect)


def test_degree_mismatch():
    d = published_flux()
    d["components"]["transformer"]["degree"] = 3
    assert _error(d) == (
        "f.json: components.transformer.degree: is 3 but coefficients has 5 entries (degree 4)"
    )


def test_domain_reversed():
    d = published_flux()
    d["components"]["transformer"]["domain"] = [0.4, 0.1]
    assert _error(d) == "f.json: components.transformer.domain: min 0.4 is greater than max 0.1"


def test_nan_coefficient_rejected_by_validation_and_write(tmp_path):
    d = published_flux()
    d["components"]["transformer"]["coefficients"] = [1.0, float("nan"), 2.0, 3.0, 4.0]
    assert _error(d) == "f.json: components.transformer.coefficients[1]: nan is not a finite number"
    target = tmp_path / "c.json"
    with pytest.raises(CalibError, match=r"coefficients\[1\]: nan is not a finite number"):
        write_document(d, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    # and the JSON encoder itself would refuse it
    with pytest.raises(ValueError):
        json.dumps(d, allow_nan=False)


def test_nan_metric_rejected_in_memory():
    d = published_flux()
    d["components"]["transformer"]["metrics"] = {"r2": float("inf")}
    assert _error(d).startswith("f.json: components.transformer.metrics.r2: inf is not allowed")


# --- load failures -----------------------------------------------------------------------------------------------
def _load_error(path) -> str:
    with pytest.raises(CalibError) as exc:
        load_document(path)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_load_missing_file(tmp_path):
    assert _load_error(tmp_path / "nope.json") == f"{tmp_path / 'nope.json'}: no such file"


def test_load_not_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "format": "calib.coefficients",\n  oops\n}\n', encoding="utf-8")
    assert _load_error(p) == f"{p}: not JSON: line 3 column 3: Expecting property name enclosed in double quotes"
    p.write_text("", encoding="utf-8")
    assert _load_error(p) == f"{p}: not JSON: the file is empty"


def test_load_not_utf8(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes('{"format": "caf\u00e9"}'.encode("latin-1"))
    assert _load_error(p).startswith(f"{p}: not UTF-8 text")


def test_load_not_an_object(tmp_path):
    p = tmp_path / "list.json"
    p.write_text("[1, 2, 3]", encoding="utf-8")
    assert _load_error(p) == f"{p}: (root): expected a JSON object, got array"


def test_load_nan_literal_reports_path(tmp_path):
    p = tmp_path / "nan.json"
    text = json.dumps(published_flux()).replace("0.264230861", "NaN")
    p.write_text(text, encoding="utf-8")
    assert _load_error(p) == f"{p}: components.transformer.coefficients[4]: nan is not a finite number"


def test_load_future_version(tmp_path):
    d = published_flux()
    d["schema_version"] = 2
    p = tmp_path / "v2.json"
    p.write_text(json.dumps(d), encoding="utf-8")
    assert "this file is version 2; calib 0.1.0 reads version 1" in _load_error(p)


# --- atomic writes -----------------------------------------------------------------------------------------------
def test_failed_validation_leaves_existing_file_unchanged(doc, tmp_path):
    path = write_document(doc, tmp_path / "coeffs.json")
    before = path.read_bytes()
    bad = copy.deepcopy(doc)
    bad["components"]["transformer"]["degree"] = 7
    with pytest.raises(CalibError, match="degree: is 7"):
        write_document(bad, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["coeffs.json"]


def test_write_atomic_bytes(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    assert write_atomic_bytes(target, b"one") == target
    assert target.read_bytes() == b"one"
    os.chmod(target, 0o640)
    write_atomic_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert target.stat().st_mode & 0o777 == 0o640  # mode of the replaced file kept
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]
    with pytest.raises(CalibError, match="it is a directory"):
        write_atomic_bytes(tmp_path / "a", b"x")


def test_write_atomic_bytes_cleans_up_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CalibError, match="cannot write .*No space left on device"):
        write_atomic_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_nan_free_output(doc, tmp_path):
    text = write_document(doc, tmp_path / "c.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in json.loads(text)["components"]["transformer"]["metrics"].values())
