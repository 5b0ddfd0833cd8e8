"""The built-in video model builtin:wan-digits: shapes, prompt errors, shipped weights, tracing through the CLI and
exact parity of the runtime at threshold 0."""

import functools
import json

import h5py
import numpy as np
import pytest
import torch

import calib.runtime as cr
from calib.adapters import get_adapter
from calib.cli import main
from calib.errors import CalibError
from calib.models import wan_digits
from calib.models.loading import load_model
from helpers import generation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 6


generate = functools.partial(generation.generate, prompts=("a handwritten 3", "seven"), steps=STEPS)  # tests/helpers/generation.py


def test_shapes_of_every_output_type(wan):
    assert wan.resolution == (4, 12, 12)
    assert generate(wan).shape == (2, 1, 4, 12, 12)
    g = torch.Generator().manual_seed(0)
    arrays = wan(["0", "one"], num_inference_steps=STEPS, generator=g, output_type="np").frames
    assert len(arrays) == 2 and arrays[0].shape == (4, 12, 12) and arrays[0].dtype == np.uint8
    videos = wan("a handwritten 5", num_inference_steps=STEPS, num_videos_per_prompt=2).frames
    assert len(videos) == 2 and len(videos[0]) == 4
    assert all(frame.size == (12, 12) and frame.mode == "L" for frame in videos[0])
    assert wan("", num_inference_steps=STEPS, guidance_scale=1.0, output_type="np").images[0].shape == (4, 12, 12)


def test_sequential_cfg_matches_batched(wan):
    torch.testing.assert_close(generate(wan, "sequential"), generate(wan, "batched"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": "a cat"},
        {"prompt": ["a handwritten 3", "3 and 4"]},
        {"prompt": []},
        {"prompt": "7", "num_inference_steps": 1},
        {"prompt": "7", "cfg_mode": "parallel"},
        {"prompt": "7", "output_type": "tensor"},
        {"prompt": "7", "height": 13},  # not a whole patch
        {"prompt": "7", "num_frames": 0},
        {"prompt": "7", "width": 130},  # beyond the rotary table
    ],
)
def test_bad_requests_are_calib_errors(wan, kwargs):
    with pytest.raises(CalibError):
        wan(**kwargs)


@pytest.mark.parametrize("kwargs, shape", [({"num_frames": 8}, (1, 8, 12, 12)),
                                           ({"height": 16, "width": 20}, (1, 4, 16, 20))])
def test_other_frame_counts_and_canvases_generate_that_shape(wan, kwargs, shape):
    # out of the training distribution, but they run: calib check measures a calibration on them
    latent = wan("a handwritten 3", num_inference_steps=STEPS, output_type="latent", **kwargs).frames[0]
    assert tuple(latent.shape) == shape
    assert torch.isfinite(latent).all()


def test_validate_prompts_names_the_bad_prompt(wan):
    wan.validate_prompts(["", "a handwritten 7", "the digit nine"])
    with pytest.raises(CalibError, match="a dog"):
        wan.validate_prompts(["a handwritten 7", "a dog"])


def test_shipped_weights_load_and_describe_their_training(wan):
    from safetensors import safe_open

    assert wan_digits.WEIGHTS_FILE.stat().st_size < 4e6
    with safe_open(str(wan_digits.WEIGHTS_FILE), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    info = json.loads(meta["training"])
    assert info["seed"] == 0 and info["loss_history"][-1][1] < info["loss_history"][0][1]
    assert keys == {f"transformer.{k}" for k in wan.transformer.state_dict()} | {
        f"prompt_encoder.{k}" for k in wan.prompt_encoder.state_dict()
    }
    assert type(wan.transformer).__name__ == "WanTransformer3DModel"
    assert 0.2e6 < sum(p.numel() for p in wan.transformer.parameters()) < 0.3e6
    assert type(load_model("builtin:wan-digits")).__name__ == "WanDigitsPipeline"
    assert get_adapter(wan.transformer).name == "wan"


def test_clips_drift_one_pixel_per_frame():
    images, _ = wan_digits.load_digits_dataset()
    clips = wan_digits.make_clips(images[:32], torch.Generator().manual_seed(0))
    assert clips.shape == (32, 1, 4, 12, 12)
    for clip, image in zip(clips[:, 0], images[:32]):
        corners = []
        for frame in clip:
            hits = [(y, x) for y in range(5) for x in range(5) if torch.equal(frame[y : y + 8, x : x + 8], image)]
            assert hits
            corners.append(np.array(hits[0]))
        steps = np.diff(np.stack(corners), axis=0)
        assert (steps == steps[0]).all() and np.abs(steps[0]).max() == 1


def test_cli_trace_records_both_cfg_streams(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.txt").write_text("a handwritten 2\nthe digit eight\n")
    code = main(["trace", "--model", "builtin:wan-digits", "--steps", str(STEPS), "--seeds", "0", "--prompts", "small.txt"])
    assert code == 0
    with h5py.File(tmp_path / "traces" / "wan-digits.h5", "r") as f:
        assert f.attrs["model_class"] == "WanTransformer3DModel"
        assert f.attrs["model_source"] == "builtin:wan-digits"
        groups = list(f["trajectories"].values())
        assert len(groups) == 4  # 2 prompts x 1 seed x (cond, uncond)
        assert sorted(g.attrs["stream"] for g in groups) == ["cond", "cond", "uncond", "uncond"]
        for g in groups:
            assert list(g.attrs["resolution"]) == [4, 12, 12]
            assert g["block_rel_l1"].shape == (STEPS, 4)
            for name in ("input_rel_l1", "output_rel_l1", "residual_rel_l1"):
                x = g[name][()]
                assert x.shape == (STEPS,) and np.isnan(x[0]) and np.all(np.isfinite(x[1:])) and np.all(x[1:] > 0)


def _identity_config(wan):
    return cr.parse(cr.document_for(wan.transformer))


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_threshold_zero_reproduces_uncached_output_exactly(wan, mode):
    base = generate(wan, mode)
    with cr.apply(wan, _identity_config(wan), threshold=0.0) as handle:
        cached = generate(wan, mode)
        stats = handle.stats()
    assert torch.equal(base, cached)
    assert stats["skipped"] == 0 and stats["computed"] > 0
    with cr.apply(wan, _identity_config(wan), threshold=10.0) as handle:  # a huge threshold must skip
        skipped = generate(wan, mode)
        assert handle.stats()["skipped"] > 0
    assert not torch.equal(base, skipped)
