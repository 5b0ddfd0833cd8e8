"""calib export: structured outputs are written by their libraries (issue 22 item 4) -- a coefficient file's strings
never add keys or code to what an export writes -- and the poly1d listing. The exports in their real consumers are
tests/integration/test_consumers.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from calib.methods.registry import write_document
from helpers.documents import FLUX, published_flux

EVIL = "transformer\ncache_backend: evil\nteacache_thresh: 1000.0\n# "


def _evil_document(tmp_path) -> Path:
    """A valid TeaCache file whose strings try to add keys / code to what the exports write."""
    d = published_flux()
    d["model"]["class"] = "FluxTransformer2DModel\ncache_backend: evil"
    d["model"]["source"] = "x\nuse_ret_steps: true"
    comp = d["components"].pop("transformer")
    d["components"] = {EVIL: comp, "b\nimport os; os.abort()": dict(comp)}
    d["thresholds"] = {"recommended": 0.9}
    return write_document(d, tmp_path / "evil.json")


def _export(*argv) -> tuple[int, str, str]:
    import contextlib
    import io

    from calib.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", *[str(a) for a in argv]])
    return code, out.getvalue(), err.getvalue()


def test_tensorrt_llm_yaml_takes_no_keys_from_file_strings(tmp_path):
    path = _evil_document(tmp_path)
    code, _, err = _export(path, "--format", "tensorrt-llm", "--out", tmp_path / "trt.yaml")
    assert code == 0, err
    config = yaml.safe_load((tmp_path / "trt.yaml").read_text())
    assert config == {"cache_config": {"cache_backend": "teacache", "teacache_thresh": 0.9, "use_ret_steps": False,
                                       "coefficients": FLUX, "coefficients_2": FLUX}}
    code, stdout, _ = _export(path, "--format", "tensorrt-llm")  # the same document on stdout
    assert code == 0 and yaml.safe_load(stdout) == config


def test_engine_and_poly1d_outputs_take_no_code_or_keys_from_file_strings(tmp_path):
    import ast

    path = _evil_document(tmp_path)
    code, stdout, err = _export(path, "--format", "vllm-omni", "--component", EVIL)
    assert code == 0, err
    assert json.loads(stdout) == {"rel_l1_thresh": 0.9, "coefficients": FLUX}
    code, stdout, err = _export(path, "--format", "sglang")
    assert code == 0, err
    module = ast.parse(stdout)
    assert [type(n) for n in module.body] == [ast.ImportFrom, ast.Assign]
    assert {k.arg for k in module.body[1].value.keywords} == {"teacache_thresh", "coefficients", "expert_coefficients",
                                                             "start_skipping", "end_skipping"}
    code, stdout, err = _export(path, "--format", "poly1d")
    assert code == 0, err
    module = ast.parse(stdout)
    assert all(isinstance(n, ast.Assign) for n in module.body)  # comments stay comments: no import, no call
    assert {t.id for n in module.body for t in n.targets} == {"coefficients", "rescale_func", "rel_l1_thresh"}


def test_poly1d_out_writes_the_listing(tmp_path):
    d = published_flux()
    d["thresholds"] = {"recommended": 0.25}
    path = write_document(d, tmp_path / "flux.json")
    code, printed, err = _export(path, "--format", "poly1d")
    assert code == 0, err
    code, stdout, err = _export(path, "--format", "poly1d", "--out", tmp_path / "flux.poly1d.py")
    assert code == 0 and stdout == f"wrote {tmp_path / 'flux.poly1d.py'}\n", err
    written = (tmp_path / "flux.poly1d.py").read_text()
    assert written == printed
    namespace = {"np": np}
    exec(compile(written, "flux.poly1d.py", "exec"), namespace)
    assert list(namespace["coefficients"]) == FLUX and namespace["rel_l1_thresh"] == 0.25
