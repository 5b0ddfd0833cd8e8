"""The validity signature (issue 24): written by every method from its traces through the CLI, compared by
calib.runtime.apply (at apply and at each generation's first call), warned once per field, refused with strict=True,
listed by stats(); files without one load and apply silently."""

from __future__ import annotations

import json
import warnings

import pytest

from cli_runner import run_cli

STEPS = 6


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    import torch

    work = tmp_path_factory.mktemp("signature")
    (work / "p.txt").write_text("a handwritten 1\na handwritten 4\na handwritten 7\n", encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_cli(["trace", "--model", "builtin:digits", "--prompts", "p.txt", "--steps", STEPS,
                                "--seeds", "0", "--out", "t.h5"], work)
        assert code == 0, err
        for method, out in (("teacache", "c.json"), ("block-cache", "b.json"), ("fastercache-cfg", "f.json")):
            code, _, err = run_cli(["fit", "t.h5", "--method", method, "--out", out], work)
            assert code == 0, err
        code, _, err = run_cli(["fit", "t.h5", "--method", "schedule", "--fractions", "0.5", "--forecast-targets",
                                "output", "--forecast-order", "1", "--search-evals", "2", "--no-cond-only", "--out",
                                "s.json"], work)
        assert code == 0, err
    finally:
        torch.set_num_threads(threads)
    return work


def _generate(pipe, steps=STEPS, guidance=3.0):
    import torch

    return pipe("a handwritten 7", num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(0), output_type="latent")


def _applied(pipe, config, **options):
    """(stats()["signature"], the warning messages) of apply + one generation with ``options``."""
    import calib.runtime as cr

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cr.apply(pipe, config, **options) as handle:
            _generate(pipe)
            listed = handle.stats()["signature"]
    return listed, [str(w.message) for w in caught if "signature" in str(w.message) or "config" in str(w.message)]


def test_every_method_writes_the_signature_of_its_traces(work):
    import calib.runtime as cr
    from calib.models.digits import load_pipeline
    from calib.runtime.signature import config_digest, weights_digest

    pipe = load_pipeline()
    for name in ("c.json", "b.json", "f.json", "s.json"):
        doc = json.loads((work / name).read_text())
        signature = doc["signature"]
        assert signature["weights"] == {"transformer": weights_digest(pipe.transformer)}, name
        assert signature["weights_sample"] == "sampled-v1"
        assert signature["config_hash"] == {"transformer": doc["model"]["config_hash"]}
        assert signature["scheduler"] == {"class": "FlowMatchEulerDiscreteScheduler",
                                          "config_hash": config_digest(pipe.scheduler)}
        assert signature["steps"] == STEPS and signature["guidance"] == 3.0 and signature["dtype"] == "float32"
        assert signature["sigmas"].startswith("sha256:") and signature["timesteps"].startswith("sha256:")
        assert signature["latent_shape"] == [16, 4]  # the packed 8x8 latent: 16 tokens of 4 channels
        assert signature["call"] == {}  # the pipeline's defaults
    # the digest the trace recorded is the one a reload computes
    assert weights_digest(load_pipeline().transformer) == weights_digest(pipe.transformer)
    for name in ("c.json", "b.json", "s.json"):  # what the runtime applies parses with it
        assert cr.load(work / name).signature["steps"] == STEPS


@pytest.mark.parametrize("name", ["c.json", "s.json", "b.json"])
def test_the_same_pipeline_warns_nothing(work, name):
    import calib.runtime as cr
    from calib.models.digits import load_pipeline

    listed, messages = _applied(load_pipeline(), cr.load(work / name))
    assert listed == [] and messages == []


def test_other_weights_warn_once_naming_the_field_and_strict_refuses(work):
    import torch

    import calib.runtime as cr
    from calib.models.digits import load_pipeline

    pipe = load_pipeline()
    first = next(iter(pipe.transformer.parameters()))
    with torch.no_grad():
        first.view(-1)[0] += 1e-3  # index 0 of every parameter is in the sample
    config = cr.load(work / "c.json")
    listed, messages = _applied(pipe, config)
    assert [m["field"] for m in listed] == ["weights"] and listed[0]["component"] == "transformer"
    assert listed[0]["expected"] == config.signature["weights"]["transformer"] != listed[0]["seen"]
    assert len(messages) == 1 and "'weights'" in messages[0] and "c.json" in messages[0], messages
    with pytest.raises(cr.SignatureMismatchError, match="'weights'"):
        cr.apply(pipe, config, strict=True)
    assert not hasattr(pipe.transformer, "_calib_cache_handle")  # a refused apply leaves no hook behind
    with pytest.raises(cr.OptionError):
        cr.apply(pipe, config, strict="yes")


def test_another_step_count_or_guidance_warns_at_generation_once_per_handle(work):
    import calib.runtime as cr
    from calib.models.digits import load_pipeline

    pipe = load_pipeline()
    config = cr.load(work / "c.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cr.apply(pipe, config) as handle:
            assert handle.stats()["signature"] == []  # nothing seen yet of a generation
            _generate(pipe, steps=STEPS + 2)
            _generate(pipe, steps=STEPS + 2)  # the same mismatch: no second warning
            _generate(pipe, guidance=4.0)
            listed = handle.stats()["signature"]
    messages = [str(w.message) for w in caught if "signature" in str(w.message)]
    assert listed == [{"field": "steps", "component": None, "expected": STEPS, "seen": STEPS + 2},
                      {"field": "guidance", "component": None, "expected": 3.0, "seen": 4.0}]
    assert len(messages) == 2 and "'steps'" in messages[0] and f"{STEPS + 2}" in messages[0], messages
    with cr.apply(pipe, config, strict=True):
        with pytest.raises(cr.SignatureMismatchError, match="'steps'"):
            _generate(pipe, steps=STEPS + 2)
    # a schedule refuses another step count as before (StepCountError, before the signature is looked at)
    with cr.apply(pipe, cr.load(work / "s.json")):
        with pytest.raises(cr.StepCountError):
            _generate(pipe, steps=STEPS + 2)


def test_another_scheduler_config_and_noise_schedule_warn(work):
    from diffusers import FlowMatchEulerDiscreteScheduler

    import calib.runtime as cr
    from calib.models.digits import load_pipeline

    pipe = load_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    listed, messages = _applied(pipe, cr.load(work / "c.json"))
    assert [m["field"] for m in listed] == ["scheduler_config", "sigmas", "timesteps"], listed
    assert len(messages) == 3


def test_a_file_without_signature_loads_and_applies_silently(work):
    import torch

    import calib.runtime as cr
    from calib.models.digits import load_pipeline

    pipe = load_pipeline()
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(1e-3)  # other weights: only a signature could tell
    for name in ("c.json", "s.json", "b.json"):
        doc = json.loads((work / name).read_text())
        del doc["signature"]
        plain = work / f"plain-{name}"
        plain.write_text(json.dumps(doc))
        config = cr.load(plain)
        assert config.signature is None
        listed, messages = _applied(pipe, config, strict=True)
        assert listed == [] and messages == []


def test_the_shipped_files_have_no_signature_and_apply_as_before():
    import calib.runtime as cr
    from calib.models.digits import load_pipeline

    config = cr.load("digits")
    assert config.signature is None
    listed, messages = _applied(load_pipeline(), config)
    assert listed == [] and messages == []


def test_a_config_hash_mismatch_is_the_signature_field_and_strict_refuses_it(work):
    import calib.runtime as cr
    from calib.models.digits import load_pipeline

    doc = json.loads((work / "c.json").read_text())
    doc["signature"]["config_hash"]["transformer"] = "sha256:" + "0" * 64
    listed, messages = _applied(load_pipeline(), cr.parse(doc))
    assert [m["field"] for m in listed] == ["config_hash"]
    assert len(messages) == 1 and "config differs" in messages[0] and "'config_hash'" in messages[0]
    with pytest.raises(cr.SignatureMismatchError, match="'config_hash'"):
        cr.apply(load_pipeline(), cr.parse(doc), strict=True)
    doc["signature"]["steps"] = "six"
    with pytest.raises(cr.CoefficientFileError, match="signature"):
        cr.parse(doc)


def test_a_resume_with_other_weights_is_refused(work):
    import shutil

    import torch

    from calib.models.digits import load_pipeline
    from calib.trace.job import run_trace
    from calib.trace.settings import TraceSettings

    shutil.copy(work / "t.h5", work / "resume.h5")
    pipe = load_pipeline()
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(1e-3)
    from calib.errors import CalibError

    with pytest.raises(CalibError, match="other weights"):
        run_trace("builtin:digits", work / "p.txt", TraceSettings(steps=STEPS, seeds=(0, 1)), out=work / "resume.h5",
                  pipe=pipe, echo=lambda *_: None)


def test_another_latent_shape_names_the_field_and_component(work):
    from types import SimpleNamespace

    import torch

    import calib.runtime as cr
    from calib.runtime.signature import SignatureCheck

    config = cr.load(work / "c.json")
    check = SignatureCheck(config)
    engine = SimpleNamespace(clock=SimpleNamespace(num_steps=STEPS), pipeline_mode=False, sigmas=None, scheduler=None)
    check.generation_seen(engine, "transformer", torch.zeros(2, 16, 4))  # the calibrated latent: nothing
    assert check.report() == []
    with pytest.warns(UserWarning, match="'latent_shape'.*another resolution"):
        check.generation_seen(engine, "transformer", torch.zeros(2, 64, 4))  # 16x16 pixels instead of 8x8
    assert check.report() == [{"field": "latent_shape", "component": "transformer", "expected": [16, 4],
                               "seen": [64, 4]}]
    with pytest.raises(cr.SignatureMismatchError, match="'latent_shape'"):
        SignatureCheck(config, strict=True).generation_seen(engine, "transformer", torch.zeros(2, 64, 4))
