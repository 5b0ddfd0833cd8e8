"""The built-in models' training scripts and weight files: a few training steps, then a save/load round trip."""

import pytest
import torch

from calib.errors import CalibError
from calib.models import builtin_pipeline, digits, train_digits, train_wan_digits, wan_digits


@pytest.mark.parametrize("trainer, model", [(train_digits, digits), (train_wan_digits, wan_digits)],
                         ids=["digits", "wan-digits"])
def test_training_runs_and_weights_round_trip(tmp_path, trainer, model):
    transformer, encoder, info = trainer.train(steps=3, batch=4, log=lambda *a: None)
    assert info["steps"] == 3 and len(info["loss_history"]) >= 1
    path = tmp_path / "w.safetensors"
    builtin_pipeline.save_weights(path, transformer, encoder, {"training": info, "config": model.TRANSFORMER_CONFIG})
    assert path.exists() and not path.with_suffix(".tmp").exists()

    pipe = model.load_pipeline(weights=path)
    for name, value in transformer.state_dict().items():
        torch.testing.assert_close(pipe.transformer.state_dict()[name], value, rtol=0, atol=0)
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(pipe.prompt_encoder.state_dict()[name], value, rtol=0, atol=0)
    out = pipe("a handwritten 4", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 1


@pytest.mark.parametrize("model", [digits, wan_digits], ids=["digits", "wan-digits"])
def test_missing_weights_name_the_training_command(tmp_path, model):
    with pytest.raises(CalibError, match=r"python -m calib\.models\.train_"):
        model.load_pipeline(weights=tmp_path / "absent.safetensors")


@pytest.mark.parametrize("model", [digits, wan_digits], ids=["digits", "wan-digits"])
@pytest.mark.parametrize("kwargs, message", [
    ({"num_inference_steps": 1}, "at least 2"),
    ({"cfg_mode": "fancy"}, "cfg_mode"),
    ({"output_type": "pt"}, "output_type"),
])
def test_pipelines_refuse_bad_arguments_with_one_line(model, kwargs, message):
    pipe = model.load_pipeline()
    with pytest.raises(CalibError, match=message):
        pipe("a handwritten 4", **kwargs)
    with pytest.raises(CalibError, match="no prompt"):
        pipe([])
