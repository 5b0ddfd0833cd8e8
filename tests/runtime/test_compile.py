"""calib under torch.compile and beside diffusers' own hooks, on the built-in digits model: a compiled transformer
(``torch.compile(transformer)``'s ``OptimizedModule`` or ``transformer.compile()`` in place) is accepted, compiles
one code path per block class, and takes the same decisions as eager."""

import contextlib

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


def block_classes(transformer):
    return {type(b) for name in ("transformer_blocks", "single_transformer_blocks") for b in getattr(transformer, name)}


def compiled_variants(cls) -> int:
    """How many compiled entries dynamo holds for a block class's forward (one per guard set it compiled)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    return len(_debug_get_cache_entry_list(cls.forward.__code__))


@contextlib.contextmanager
def dynamo_messages():
    """The messages torch._dynamo logs inside the block (the recompile-limit warning is one)."""
    import logging

    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    keep = Keep()
    logging.getLogger("torch._dynamo").addHandler(keep)
    try:
        yield messages
    finally:
        logging.getLogger("torch._dynamo").removeHandler(keep)


def compiled_run(pipe, backend, config, threshold, in_place):
    """Two generations on the compiled transformer; the recompile-limit warnings and graph breaks dynamo counted."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    if in_place:
        pipe.transformer.compile(backend=backend)
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    breaks = []
    with dynamo_messages() as messages, cr.apply(pipe, config, threshold=threshold) as handle:
        for seed in (0, 1):
            generate(pipe, seed)
            breaks.append(sum(counters["graph_break"].values()))
        decisions = computed(handle)
    return decisions, breaks, [m for m in messages if "recompile_limit" in m or "cache_size_limit" in m]


@pytest.mark.parametrize("backend,in_place", [("eager", True), ("aot_eager", False)])
def test_compiled_transformer_one_code_path_per_block_class_same_decisions(pipe, backend, in_place):
    config = cr.load("coeffs/digits.json")
    with cr.apply(pipe, config, threshold=0.3) as handle:
        generate(pipe, 0), generate(pipe, 1)
        eager = computed(handle)
    assert 0 < sum(c for *_, c in eager) < 2 * 2 * STEPS  # the gate skips some steps
    decisions, breaks, limit_warnings = compiled_run(pipe, backend, config, 0.3, in_place)
    assert decisions == eager
    assert limit_warnings == []
    # graph breaks only on the first call, none per step and none in the second generation: calib's transformer hook
    # (a diffusers HookRegistry hook: counted in torch's _call_impl frame and in the registry's wrapper frame) and the
    # transformer's block loop calling calib's block hook (dynamo then compiles each block's own forward)
    assert breaks[0] == breaks[1] == 3
    transformer = cr.handle.compiled_original(pipe.transformer)
    for cls in block_classes(transformer):
        instances = sum(isinstance(b, cls) for b in transformer.modules())
        # FLUX's single blocks see two input strides (the first one after the concatenation): two entries for 4 blocks
        assert 1 <= compiled_variants(cls) <= 2, (cls.__name__, instances)
    assert "forward" not in vars(transformer)


def test_inductor_same_computed_steps_as_eager(pipe):
    config = cr.load("coeffs/digits.json")
    with cr.apply(pipe, config, threshold=0.3) as handle:
        generate(pipe, 0), generate(pipe, 1)
        eager = computed(handle)
    decisions, breaks, limit_warnings = compiled_run(pipe, "inductor", config, 0.3, True)
    assert decisions == eager and limit_warnings == [] and breaks[0] == breaks[1]


def test_another_active_cache_is_refused_in_one_line(pipe):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    config = cr.load("coeffs/digits.json")
    transformer = pipe.transformer
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    with pytest.raises(cr.OtherCacheError, match=r"FirstBlockCacheConfig \(enable_cache\); call "
                                                 r"transformer.disable_cache\(\) first") as err:
        cr.apply(pipe, config)
    assert isinstance(err.value, cr.ModelMismatchError) and "\n" not in str(err.value)
    assert not hasattr(transformer, "_calib_cache_handle") and "calib" not in repr(transformer._diffusers_hook)
    transformer.disable_cache()
    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=0.05))  # a hook without enable_cache
    with pytest.raises(cr.OtherCacheError, match="First Block Cache"):
        cr.apply(pipe, config)
    transformer._diffusers_hook.remove_hook("fbc_leader_block_hook")
    transformer._diffusers_hook.remove_hook("fbc_block_hook")
    transformer._is_cached = True  # how cache-dit marks the transformer it patched
    with pytest.raises(cr.OtherCacheError, match=r"cache-dit .*cache_dit.disable_cache\(pipe\)"):
        cr.apply(pipe, config)
    del transformer._is_cached
    with cr.apply(pipe, config) as handle:
        generate(pipe)
    assert handle.stats()["steps"] > 0


def test_a_cache_enabled_after_apply_refuses_the_next_generation(pipe):
    from diffusers.hooks import FirstBlockCacheConfig

    with cr.apply(pipe, cr.load("coeffs/digits.json")) as handle:
        generate(pipe)
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
        with pytest.raises(cr.OtherCacheError, match="now also runs diffusers' FirstBlockCacheConfig"):
            generate(pipe)
        pipe.transformer.disable_cache()
        generate(pipe)
    assert len({t["generation"] for t in handle.stats()["trajectories"]}) == 2


def test_the_transformer_hook_is_a_diffusers_hook_and_remove_is_exact(pipe):
    transformer = pipe.transformer
    before = dict(vars(transformer))
    handle = cr.apply(pipe, cr.load("coeffs/digits.json"))
    assert "calib_cache" in transformer._diffusers_hook.hooks  # diffusers' inspection lists calib's hook
    generate(pipe)
    handle.remove()
    assert vars(transformer).keys() == before.keys() and "_diffusers_hook" not in vars(transformer)
    assert all(vars(transformer)[k] is v for k, v in before.items() if k != "_modules")


def test_more_blocks_than_the_recompile_limit_compile_once_per_class():
    """A random FLUX with 19 blocks (16 single: twice dynamo's recompile_limit of 8), 10 steps twice: same computed
    steps as eager, no recompile-limit warning, one or two compiled entries per block class."""
    import torch._dynamo
    from diffusers import FluxTransformer2DModel
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=3, num_single_layers=16,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    config = cr.parse(cr.document_for(model, (1.0, 0.0)))

    def run():
        torch.manual_seed(1)
        x, enc, pooled = torch.randn(1, 16, 8), torch.randn(1, 4, 16), torch.randn(1, 8)
        for i in range(10):
            with torch.no_grad():
                out = model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                            timestep=torch.tensor([1.0 - i / 10]), img_ids=torch.zeros(16, 3),
                            txt_ids=torch.zeros(4, 3), return_dict=False)[0]
            x = x - 0.1 * out

    with cr.apply(model, config, threshold=0.15, num_steps=10) as handle:
        run(), run()
        eager = computed(handle)
    assert 2 * 2 < sum(c for *_, c in eager) < 2 * 10
    torch._dynamo.reset()
    counters.clear()
    model.compile(backend="eager")
    with dynamo_messages() as messages, cr.apply(model, config, threshold=0.15, num_steps=10) as handle:
        run()
        breaks = sum(counters["graph_break"].values())
        run()
        assert sum(counters["graph_break"].values()) == breaks  # none per step
        assert computed(handle) == eager
    assert not [m for m in messages if "recompile_limit" in m]
    for cls in block_classes(model):
        assert 1 <= compiled_variants(cls) <= 2, cls.__name__
