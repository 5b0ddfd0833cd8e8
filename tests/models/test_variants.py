"""The built-in variants of builtin:digits that calibrations are checked against: a LoRA that changes the style
(builtin:digits-lora) and few-step students (builtin:digits-4step, builtin:digits-8step). Each loads and
generates, differs from the base where it should (measured on the same seeds), and traces through the CLI."""

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


def test_the_variants_use_the_digits_prompts_and_reader(monkeypatch):
    monkeypatch.setattr(digit_reader, "digit_classifier", lambda: "the classifier")  # no fit: only which models
    for variant in ("digits-lora", "digits-4step", "digits-8step"):
        assert bundled_prompts_path(variant) == bundled_prompts_path("digits")
        assert digit_reader.digit_reader(digit_reader.builtin_name(f"builtin:{variant}", None)) is not None
    assert digit_reader.digit_reader(digit_reader.builtin_name("org/some-model", object())) is None


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


# -- the few-step student ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student4():
    return load_model("builtin:digits-4step")


@pytest.fixture(scope="module")
def student8():
    return load_model("builtin:digits-8step")


def psnr_against(imgs: np.ndarray, reference: np.ndarray) -> float:
    mse = float((((imgs.astype(np.float64) - reference.astype(np.float64)) / 255.0) ** 2).mean())
    return 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("name, steps", [("builtin:digits-4step", 4), ("builtin:digits-8step", 8)])
def test_student_runs_its_step_count_without_guidance_by_default(name, steps):
    pipe = load_model(name)
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["hidden_states"]),
                                                  with_kwargs=True)
    try:
        pipe("a handwritten 5", output_type="np", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(calls) == steps and all(c.shape[0] == 1 for c in calls)  # one call per step: no CFG batch


def test_students_are_legible_and_closer_to_the_teacher_than_the_base_at_few_steps(pipe, student4, student8, reader):
    teacher = images(pipe, 30)  # the base model as served: 30 steps, guidance 3
    by_student = {4: images(student4, 4, guidance=1.0), 8: images(student8, 8, guidance=1.0)}
    for steps, imgs in by_student.items():
        assert read_correctly(reader, imgs) >= 0.95, steps
    # measured on 8 seeds (docs/models.md): base at 4 steps 23.6 dB against the teacher's own 30-step output,
    # the 4-step student about 3 dB above it; at the same transformer work (base at 2 steps with CFG) 15.2 dB
    student_db = psnr_against(by_student[4], teacher)
    assert student_db > psnr_against(images(pipe, 4), teacher) + 1.5
    assert student_db > psnr_against(images(pipe, 2), teacher) + 6.0


def test_weights_digest_tells_the_students_from_the_base(pipe, student4, student8):
    digests = {weights_digest(m.transformer) for m in (pipe, student4, student8)}
    assert len(digests) == 3


def test_only_the_shipped_step_counts_have_a_student():
    from calib.models import digits_fewstep

    with pytest.raises(CalibError, match="no 5-step student"):
        digits_fewstep.load_pipeline(steps=5)


def test_fewstep_training_runs_and_weights_round_trip(tmp_path):
    from calib.models import builtin_pipeline, digits_fewstep, train_digits_fewstep

    students = train_digits_fewstep.train(steps=2, batch=4, pairs=4, log=lambda *a: None)
    assert set(students) == {4, 8}
    for n, (transformer, encoder, info) in students.items():
        assert info["steps"] == 2 and info["grid"] == [round(s, 4) for s in train_digits_fewstep.sigma_grid(n)]
        path = tmp_path / f"s{n}.safetensors"
        builtin_pipeline.save_weights(path, transformer, encoder, {"training": info})
        pipe = digits_fewstep.load_pipeline(steps=n, weights=path)
        for name, value in transformer.state_dict().items():
            torch.testing.assert_close(pipe.transformer.state_dict()[name], value, rtol=0, atol=0)


def test_teacher_trajectories_follow_the_served_teacher(pipe):
    """On the pipeline's own 30-step grid the trainer's teacher loop ends where the served pipeline does."""
    from calib.models import train_digits_fewstep

    states, labels = train_digits_fewstep.teacher_trajectories(pipe, 10, 0, train_digits_fewstep.sigma_grid(30),
                                                               log=lambda *a: None)
    assert labels.tolist()[:9] == list(range(9)) and labels[9] == digits.NULL_CLASS
    prompts = [f"a handwritten {d}" for d in range(9)]
    out = pipe(prompts, num_inference_steps=30, guidance_scale=3.0, output_type="latent", latents=states[:9, 0])
    torch.testing.assert_close(torch.stack(out.images), states[:9, -1], rtol=0, atol=1e-5)
    null = pipe("", num_inference_steps=30, guidance_scale=1.0, output_type="latent", latents=states[9:, 0])
    torch.testing.assert_close(null.images[0], states[9, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("extra, streams", [([], {"cond", "uncond"}), (["--guidance", "1"], {"cond"})],
                         ids=["default-guidance", "guidance-1"])
def test_calib_trace_runs_on_the_4step_student(tmp_path, extra, streams):
    from calib.store import read_traces

    code, out, err = run_cli(["trace", "--model", "builtin:digits-4step", "--steps", "4", "--seeds", "0",
                              "--device", "cpu", "--out", "t.h5", *extra], tmp_path)
    assert code == 0, err
    trajectories = read_traces([tmp_path / "t.h5"]).trajectories
    assert len({t.prompt for t in trajectories}) == 10  # the bundled digits prompts
    assert {t.stream for t in trajectories} == streams and all(t.steps == 4 for t in trajectories)
