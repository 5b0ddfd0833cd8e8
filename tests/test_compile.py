"""calib under torch.compile and beside diffusers' own hooks, on the built-in digits model: a compiled transformer
(``torch.compile(transformer)``'s ``OptimizedModule`` or ``transformer.compile()`` in place) is accepted, compiles
one code path per block class, and takes the same decisions as eager."""

import pytest
import torch

import calib.runtime as cr
from calib.models import digits

STEPS = 10


@pytest.fixture()
def pipe():
    return digits.load_pipeline()


def generate(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(["a handwritten 3", "7"], num_inference_steps=STEPS, guidance_scale=3.0, generator=g,
                output_type="latent").images


def computed(handle):
    return [(t["generation"], t["stream"], t["computed"]) for t in handle.stats()["trajectories"]]


def test_optimized_module_is_the_model_it_compiles(pipe):
    config = cr.load("coeffs/digits.json")
    original = pipe.transformer
    compiled = torch.compile(original, backend="eager")
    pipe.transformer = compiled
    handle = cr.apply(pipe, config, threshold=0.3)  # not refused as a model mismatch
    assert "forward" in vars(original)  # the real module is hooked; the wrapper calls it
    handle.remove()
    assert "forward" not in vars(original)
    with cr.apply(compiled, config, threshold=0.3, num_steps=STEPS):  # a bare compiled transformer too
        assert "forward" in vars(original)
    assert cr.document_for(compiled)["model"]["class"] == type(original).__name__
