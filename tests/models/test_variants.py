"""The built-in variants of builtin:digits that calibrations are checked against: a LoRA that changes the style
(builtin:digits-lora) and a few-step student (builtin:digits-4step / -8step). Each loads and generates, differs from
the base where it should (measured on the same seeds), and traces through the CLI."""

import sys

import numpy as np
import pytest
import torch

from calib.errors import CalibError
from calib.models import digit_reader, digits, digits_lora
from calib.models.loading import load_model
from calib.runtime.signature import weights_digest
from calib.trace.prompts import bundled_prompts_path
from cli_runner import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [f"a handwritten {d}" for d in range(10)]
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def reader():
    return digit_reader.digit_classifier()


@pytest.fixture(scope="module")
def lora():
    return load_model("builtin:digits-lora")


def images(pipe, steps: int, guidance: float = 3.0, seeds=SEEDS) -> np.ndarray:
    """The ten digits x ``seeds`` as uint8 8x8 arrays, (seeds x 10, 8, 8)."""
    return np.concatenate([np.stack(pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                                         output_type="np", generator=torch.Generator().manual_seed(s)).images)
                           for s in seeds])


def read_correctly(reader, imgs) -> float:
    return float((digit_reader.classify(reader, imgs) == np.tile(np.arange(10), len(imgs) // 10)).mean())


def test_lora_draws_bolder_digits_that_still_read(pipe, lora, reader):
    base, bold = images(pipe, 30), images(lora, 30)
    # measured on 8 seeds: mean ink 0.317 (base) -> 0.438 (LoRA); here 2 seeds
    assert bold.mean() / 255 > 1.25 * base.mean() / 255
    assert read_correctly(reader, base) == 1.0
    assert read_correctly(reader, bold) >= 0.95


def test_lora_is_the_base_transformer_plus_an_active_peft_adapter(pipe, lora):
    from peft.tuners.lora import LoraLayer

    assert lora.transformer.active_adapters() == [digits_lora.ADAPTER_NAME]
    adapted = [name for name, m in lora.transformer.named_modules() if isinstance(m, LoraLayer)]
    assert "transformer_blocks.0.attn.to_q" in adapted and "single_transformer_blocks.3.proj_mlp" in adapted
    assert not any(".norm" in name for name in adapted)  # the modulation keeps the base weights
    # With the adapter switched off it is exactly the base model: the base weights are untouched (not fused).
    lora.transformer.disable_adapters()
    try:
        torch.testing.assert_close(images(lora, 4, seeds=(0,)), images(pipe, 4, seeds=(0,)), rtol=0, atol=0)
    finally:
        lora.transformer.enable_adapters()
    assert not np.array_equal(images(lora, 4, seeds=(0,)), images(pipe, 4, seeds=(0,)))


def test_weights_digest_tells_the_lora_from_the_base(pipe, lora):
    assert weights_digest(lora.transformer) != weights_digest(pipe.transformer)
    assert weights_digest(load_model("builtin:digits-lora").transformer) == weights_digest(lora.transformer)


def test_the_variants_use_the_digits_prompts():
    assert bundled_prompts_path("digits-lora") == bundled_prompts_path("digits")


def test_without_peft_the_lora_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError, as where it is not installed
    with pytest.raises(CalibError, match=r"pip install 'calib\[lora\]'") as info:
        load_model("builtin:digits-lora")
    assert "\n" not in str(info.value)
    code, out, err = run_cli(["trace", "--model", "builtin:digits-lora", "--steps", "2", "--seeds", "0",
                              "--out", "t.h5"], tmp_path)
    assert code == 2 and not (tmp_path / "t.h5").exists()
    assert err.strip().splitlines() == [f"calib: error: {info.value}"]


def test_missing_lora_weights_name_the_training_command(tmp_path):
    with pytest.raises(CalibError, match=r"python -m calib\.models\.train_digits_lora"):
        digits_lora.load_pipeline(adapter=tmp_path / "absent.safetensors")


def test_lora_training_runs_and_its_adapter_round_trips(tmp_path):
    from calib.models import train_digits_lora

    transformer, info = train_digits_lora.train(steps=2, batch=4, log=lambda *a: None)
    assert info["steps"] == 2 and info["adapter_parameters"] > 0
    path = tmp_path / "lora.safetensors"
    digits_lora.save_adapter(path, transformer, {"training": info})
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert saved and all(k.startswith("transformer.") and ".lora_" in k for k in saved)  # the adapter only
    pipe = digits_lora.load_pipeline(adapter=path)
    trained = {k: v for k, v in transformer.state_dict().items() if "lora_" in k}
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if "lora_" in k}
    assert trained.keys() == loaded.keys()
    for name, value in trained.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


def test_calib_trace_runs_on_the_lora(tmp_path):
    from calib.store import read_traces

    (tmp_path / "p.txt").write_text("a handwritten 3\nseven\n")
    code, out, err = run_cli(["trace", "--model", "builtin:digits-lora", "--prompts", "p.txt", "--steps", "4",
                              "--seeds", "0", "--device", "cpu", "--out", "t.h5"], tmp_path)
    assert code == 0, err
    trajectories = read_traces([tmp_path / "t.h5"]).trajectories
    assert sorted((t.prompt, t.stream) for t in trajectories) == [
        ("a handwritten 3", "cond"), ("a handwritten 3", "uncond"), ("seven", "cond"), ("seven", "uncond")]
    assert all(t.steps == 4 for t in trajectories)
