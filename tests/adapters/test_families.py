"""Every built-in adapter on a tiny random transformer of its family, driven by a stand-in pipeline (no VAE, no
text encoders), for what the real pipelines (tests/integration/test_real_pipelines.py) cannot show: the CFG layout a family's
real pipeline does not use (a custom loop may batch Wan's CFG, or call CogVideoX twice), classes no real pipeline here
builds (Wan2.2 TI2V's per-token timesteps, SD3.5's dual-attention block), the recomputed modulated input against what
the block feeds its attention, one polynomial per Wan2.2 expert, unsupported classes and ``--modulation-module``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import diffusers
import numpy as np
import pytest
import torch

import calib.runtime as cr
from calib.adapters import custom_adapter, get_adapter
from calib.errors import CalibError
from calib.trace import TraceSettings, Tracer

STEPS = 5
GUIDANCE = 3.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the models are tiny


@dataclass(frozen=True)
class Family:
    """A tiny model of one family and how its pipeline calls it."""

    cls: str
    config: dict
    latent: tuple  # latent shape without the batch dimension
    text: dict  # random per-prompt inputs (drawn from the generator): name -> shape without batch
    extra: Callable[[int], dict] = lambda b: {}  # fixed inputs for a batch of b
    timestep: Callable[[torch.Tensor, int], torch.Tensor] = lambda t, b: t.expand(b)
    concat_channels: int = 0  # image-to-video: condition latents concatenated to the input along dim 1

    def build(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return getattr(diffusers, self.cls)(**self.config).eval()


def _ones(b, n, dtype=torch.float32):
    return torch.ones(b, n, dtype=dtype)


_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)

FAMILIES = {
    "flux": Family(
        "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 4, 8)),
        latent=(16, 4),
        text={"encoder_hidden_states": (8, 16), "pooled_projections": (8,)},
        extra=lambda b: {"img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3)},
        timestep=lambda t, b: (t / 1000).expand(b),
    ),
    "wan_t2v": Family("WanTransformer3DModel", _WAN, latent=(4, 2, 8, 8), text={"encoder_hidden_states": (8, 16)}),
    "wan_i2v": Family(
        "WanTransformer3DModel",
        {**_WAN, "in_channels": 9, "image_dim": 16, "added_kv_proj_dim": 24},
        latent=(4, 2, 8, 8),
        # Wan's I2V attention takes everything before the last 512 text tokens as image tokens.
        text={"encoder_hidden_states": (512, 16), "encoder_hidden_states_image": (4, 16)},
        concat_channels=5,
    ),
    "wan_ti2v": Family(  # Wan 2.2 5B: one timestep per latent token (expand_timesteps)
        "WanTransformer3DModel", _WAN, latent=(4, 2, 8, 8), text={"encoder_hidden_states": (8, 16)},
        timestep=lambda t, b: t.expand(b, 2 * 4 * 4),
    ),
    "hunyuan_video": Family(
        "HunyuanVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
             text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
        latent=(4, 1, 8, 8),
        text={"encoder_hidden_states": (12, 16), "pooled_projections": (8,)},
        extra=lambda b: {"encoder_attention_mask": _ones(b, 12), "guidance": torch.full((b,), 6000.0)},
    ),
    "cogvideox": Family(
        "CogVideoXTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
             text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
             temporal_compression_ratio=4, max_text_seq_length=8),
        latent=(1, 4, 8, 8),
        text={"encoder_hidden_states": (8, 8)},
    ),
    "ltx_video": Family(
        "LTXVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
             num_layers=2, caption_channels=16),
        latent=(2 * 4 * 4, 4),
        text={"encoder_hidden_states": (8, 16)},
        extra=lambda b: {"encoder_attention_mask": _ones(b, 8), "num_frames": 2, "height": 4, "width": 4},
    ),
    "mochi": Family(
        "MochiTransformer3DModel",
        dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
             in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
             activation_fn="swiglu", max_sequence_length=16),
        latent=(4, 2, 8, 8),
        text={"encoder_hidden_states": (16, 16)},
        extra=lambda b: {"encoder_attention_mask": _ones(b, 16, torch.bool)},
    ),
    "sd3": Family(
        "SD3Transformer2DModel",
        dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4,
             pos_embed_max_size=16, dual_attention_layers=(), qk_norm=None),
        latent=(4, 8, 8),
        text={"encoder_hidden_states": (8, 16), "pooled_projections": (16,)},
    ),
    "sd35": Family(  # SD3.5: dual attention in the first block (SD35AdaLayerNormZeroX), rms qk norm
        "SD3Transformer2DModel",
        dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4,
             pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
        latent=(4, 8, 8),
        text={"encoder_hidden_states": (8, 16), "pooled_projections": (16,)},
    ),
    "qwenimage": Family(
        "QwenImageTransformer2DModel",
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        latent=(16, 16),
        text={"encoder_hidden_states": (8, 16)},
        extra=lambda b: {"encoder_hidden_states_mask": _ones(b, 8, torch.long), "img_shapes": [(1, 4, 4)] * b},
        timestep=lambda t, b: (t / 1000).expand(b),
    ),
    "lumina2": Family(
        "Lumina2Transformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
             num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
             scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(32, 32, 32), cap_feat_dim=16),
        latent=(4, 8, 8),
        text={"encoder_hidden_states": (8, 16)},
        extra=lambda b: {"encoder_attention_mask": _ones(b, 8, torch.bool)},
        timestep=lambda t, b: (1 - t / 1000).expand(b),
    ),
    "sana": Family(
        "SanaTransformer2DModel",
        dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
             num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
             sample_size=8),
        latent=(4, 8, 8),
        text={"encoder_hidden_states": (8, 8)},
    ),
    "pixart": Family(
        "PixArtTransformer2DModel",
        dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=2, in_channels=4,
             cross_attention_dim=8, out_channels=4, attention_bias=True, activation_fn="gelu-approximate",
             num_embeds_ada_norm=8, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
             use_additional_conditions=False, caption_channels=None),
        latent=(4, 8, 8),
        text={"encoder_hidden_states": (8, 8)},
        extra=lambda b: {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
    ),
    "cosmos": Family(
        "CosmosTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
             text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 16, 16), patch_size=(1, 2, 2),
             rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable"),
        latent=(4, 1, 8, 8),
        text={"encoder_hidden_states": (12, 16)},
        extra=lambda b: {"attention_mask": _ones(b, 12), "fps": 30},  # padding_mask needs torchvision
    ),
}


class StandInPipeline:
    """What calib needs of a diffusers pipeline: ``transformer`` (and ``transformer_2`` with ``boundary_ratio``, as
    Wan2.2's two experts), a scheduler, and a denoising loop with batched or separate CFG."""

    def __init__(self, family: Family, transformer, transformer_2=None, boundary_ratio=None):
        self.family = family
        self.transformer = transformer
        if transformer_2 is not None:
            self.transformer_2 = transformer_2
        self.boundary_ratio = boundary_ratio
        self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler()

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=None,
                 output_type="latent", cfg_mode="batched", **kwargs):
        f = self.family
        self.scheduler.set_timesteps(num_inference_steps)
        latents = torch.randn((1, *f.latent), generator=generator)
        cond = {k: torch.randn((1, *s), generator=generator) for k, s in f.text.items()}
        uncond = {k: torch.randn((1, *s), generator=generator) for k, s in f.text.items()}
        image = torch.randn((1, f.concat_channels, *f.latent[1:]), generator=generator) if f.concat_channels else None
        cfg = guidance_scale > 1
        boundary = (self.boundary_ratio or 0) * self.scheduler.config.num_train_timesteps
        for t in self.scheduler.timesteps:
            model = self.transformer if t >= boundary else self.transformer_2
            if cfg and cfg_mode == "batched":  # diffusers' layout: [negative, positive]
                text = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
                batch = torch.cat([latents] * 2)
                pred_uncond, pred_cond = self._predict(model, batch, t, text, image, "cond_uncond").chunk(2)
            else:
                pred_cond = self._predict(model, latents, t, cond, image, "cond" if cfg else None)
                pred_uncond = self._predict(model, latents, t, uncond, image, "uncond") if cfg else None
            pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond) if cfg else pred_cond
            latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
        return SimpleNamespace(images=latents)

    def _predict(self, model, latents, t, text, image, context=None):
        b = latents.shape[0]
        x = latents if image is None else torch.cat([latents, image.expand(b, *image.shape[1:])], dim=1)
        inputs = dict(hidden_states=x, timestep=self.family.timestep(t, b), **text, **self.family.extra(b))
        # Like diffusers' pipelines (Wan, HunyuanVideo, Qwen-Image; LTX, CogVideoX and Mochi batch CFG under
        # "cond_uncond"): calls run under cache_context where the model has it, else plain (SD3, Sana, Lumina2...).
        named = context is not None and hasattr(model, "cache_context")
        with model.cache_context(context) if named else contextlib.nullcontext():
            return model(**inputs, return_dict=False)[0]


@functools.lru_cache(maxsize=None)
def stand_in(name: str) -> StandInPipeline:
    return StandInPipeline(FAMILIES[name], FAMILIES[name].build())


# `calib trace --model test_families:tiny_<family>` builds these (the module:function form of --model).
def _factory(name: str):
    def make() -> StandInPipeline:
        return StandInPipeline(FAMILIES[name], FAMILIES[name].build())

    make.__name__ = f"tiny_{name}"
    return make


for _name in FAMILIES:
    globals()[f"tiny_{_name}"] = _factory(_name)

TWO_EXPERT_BOUNDARY = 0.5


def tiny_wan_two_expert() -> StandInPipeline:
    """Wan2.2 A14B in small: ``transformer`` for timesteps >= 500, ``transformer_2`` (other weights) below."""
    family = FAMILIES["wan_t2v"]
    return StandInPipeline(family, family.build(0), family.build(1), boundary_ratio=TWO_EXPERT_BOUNDARY)


# Not tests/helpers/generation.py: a stand-in pipeline here (no VAE, one prompt), whose output is what is compared.
def generate(pipe, cfg_mode="batched", seed=0):
    return pipe("a prompt", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(seed), cfg_mode=cfg_mode).images


def make_config(transformer, components=("transformer",), adapter=None, indicator="modulated_input"):
    doc = cr.document_for(transformer, components=components, indicator=indicator)
    if adapter:
        doc["model"]["adapter"] = adapter
    return cr.parse(doc)


def defined_from(name: str) -> int:
    """The first step a traced series has a value for: a change needs the previous step (1); First Block Cache's
    ``head_residual_diff{k}`` the step k before; per-step values (``head_residual_absmean``, ``call_rows``) none."""
    if name in ("head_residual_absmean", "call_rows"):
        return 0
    lag = re.fullmatch(r"head_residual_diff(\d+)", name)
    return int(lag.group(1)) if lag else 1


def check_series(traj, steps):
    """Every series has one entry per step; NaN before the step it is defined from (entry 0 for a change: no previous
    step), finite from then on."""
    series = {"input": traj.input_rel_l1, "output": traj.output_rel_l1, "residual": traj.residual_rel_l1,
              **{f"block {n}": traj.block_rel_l1[:, i] for i, n in enumerate(traj.block_names)}, **traj.extra}
    for name, values in series.items():
        assert len(values) == steps, name
        start = defined_from(name)
        assert np.isnan(values[:start]).all(), name
        assert np.isfinite(values[start:]).all(), (name, values)


# The CFG layout each family's real diffusers pipeline uses, which tests/integration/test_real_pipelines.py runs on the real
# pipeline (separate: cond and uncond calls; batched: one call of [uncond, cond]). The stand-in runs the other one.
# HunyuanVideo's pipeline (guidance-distilled) calls cond only: both layouts run here.
REAL_PIPELINE_CFG = {"flux": "separate", "wan_t2v": "separate", "wan_i2v": "separate", "cogvideox": "batched",
                     "ltx_video": "batched", "mochi": "batched", "sd3": "batched", "qwenimage": "separate",
                     "lumina2": "separate", "sana": "batched", "pixart": "batched", "cosmos": "separate"}


def layouts_not_in_real_pipelines(name: str) -> list[str]:
    return [mode for mode in ("batched", "separate") if REAL_PIPELINE_CFG.get(name) != mode]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(name):
    pipe = stand_in(name)
    transformer = pipe.transformer
    adapter = get_adapter(transformer)
    assert type(transformer).__name__ in adapter.model_classes
    modes = layouts_not_in_real_pipelines(name)

    # (1) the tracer: batched CFG gives rows uncond/cond, separate calls give cond/uncond
    traced = {}
    with warnings.catch_warnings(), Tracer(pipe) as tracer:
        warnings.filterwarnings("error", message="calib:")  # e.g. the consumer check below failing
        for mode in modes:
            traced[mode] = tracer.trace("a prompt", 0, TraceSettings(steps=STEPS, guidance=GUIDANCE, seeds=(0,),
                                                                     pipeline_kwargs={"cfg_mode": mode}))
    # where the adapter names the layer fed the modulated input, the tracer took it there (checked, not recomputed)
    assert tracer.recorders[0]._consumer_ok is (adapter.modulated_input_consumer is not None)
    for trajectories in traced.values():
        assert sorted(t.stream for t in trajectories) == ["cond", "uncond"]
        assert len(trajectories[0].block_names) == len(adapter.blocks(transformer))
        for traj in trajectories:
            assert traj.component == "transformer"
            assert list(traj.step_index) == list(range(STEPS))
            check_series(traj, STEPS)
            assert "temb_rel_l1" in traj.extra
    if "batched" in traced:  # batch rows are traced apart: the two CFG branches see different text
        assert not np.allclose(traced["batched"][0].output_rel_l1[1:], traced["batched"][1].output_rel_l1[1:])

    for mode, n_streams in (("batched", 1), ("separate", 2)):
        if mode not in modes:
            continue
        base = generate(pipe, mode)
        # (2) threshold 0 computes every step: bit-identical to the uncached run
        with cr.apply(pipe, make_config(transformer), threshold=0) as handle:
            assert torch.equal(generate(pipe, mode), base)
            assert handle.stats()["skipped"] == 0
        # (3) a huge threshold computes only the first and last step of each stream; (4) streams keep their own state
        with cr.apply(pipe, make_config(transformer), threshold=1e9) as handle:
            cached = generate(pipe, mode)
            stats = handle.stats()
        assert len({t["stream"] for t in stats["trajectories"]}) == len(stats["trajectories"]) == n_streams
        for traj in stats["trajectories"]:
            assert traj["steps"] == STEPS and traj["computed"] == 2
            assert traj["skipped_steps"] == list(range(1, STEPS - 1))
        assert cached.shape == base.shape and torch.isfinite(cached).all() and not torch.equal(cached, base)
        assert torch.equal(generate(pipe, mode), base)  # removed: the model is as before


@pytest.mark.parametrize("name", [n for n in FAMILIES if get_adapter(FAMILIES[n].cls).modulated_input is not None])
def test_modulated_input_is_what_the_block_feeds_its_attention(name):
    """For blocks without a modulation layer the adapter recomputes the modulated input (the runtime must: it
    decides before the block runs); it must be bit-identical to the tensor the block itself gives its
    self-attention, which is where the tracer reads it."""
    pipe = stand_in(name)
    adapter = get_adapter(pipe.transformer)
    block = adapter.blocks(pipe.transformer)[0][1]
    attention = block.get_submodule(adapter.modulated_input_consumer)  # the tracer reads it there
    seen = []

    def ours(module, args, kwargs):
        seen.append(adapter.modulated_input(module, args, kwargs))

    def theirs(module, args, kwargs):
        seen.append(kwargs.get("hidden_states", args[0] if args else None))

    hooks = [block.register_forward_pre_hook(ours, with_kwargs=True),
             attention.register_forward_pre_hook(theirs, with_kwargs=True)]
    try:
        generate(pipe)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 2 * STEPS
    for ours, theirs in zip(seen[::2], seen[1::2]):
        assert torch.equal(ours, theirs)


def cli(*argv: str) -> int:
    from calib.cli import main

    return main(list(argv))


# Classes no real pipeline in tests/real_pipelines.py builds; the others run `calib trace --model FOLDER` there.
NOT_BUILT_AS_REAL_PIPELINES = ("wan_ti2v", "sd35")


@pytest.mark.parametrize("name", NOT_BUILT_AS_REAL_PIPELINES)
def test_calib_trace_command_on_a_tiny_model(name, tmp_path, monkeypatch):
    """`calib trace --model module:function` as a user runs it, on a tiny model of a family: the trace file
    names the class and its adapter and holds, per seed, a cond and an uncond trajectory whose every series has one
    finite value per step after the first."""
    from calib.store import read_traces

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a prompt\n")
    spec = f"{__name__}:tiny_{name}"
    assert cli("trace", "--model", spec, "--prompts", "p.txt", "--steps", str(STEPS), "--seeds", "0,1",
               "--guidance", str(GUIDANCE)) == 0
    traces = read_traces([tmp_path / "traces" / f"tiny_{name}.h5"])
    family = FAMILIES[name]
    adapter = get_adapter(family.cls)
    assert traces.model_info["class"] == family.cls and traces.model_info["source"] == spec
    assert traces.model_info["adapter"] == adapter.name
    assert sorted((t.seed, t.stream) for t in traces.trajectories) == [(0, "cond"), (0, "uncond"), (1, "cond"),
                                                                       (1, "uncond")]
    n_blocks = len(adapter.blocks(stand_in(name).transformer))
    for traj in traces.trajectories:
        assert traj.component == "transformer" and traj.steps == STEPS
        assert traj.block_rel_l1.shape == (STEPS, n_blocks)
        check_series(traj, STEPS)
    seed0 = [t for t in traces.trajectories if t.seed == 0]
    seed1 = [t for t in traces.trajectories if t.seed == 1]
    assert not np.array_equal(seed0[0].output_rel_l1[1:], seed1[0].output_rel_l1[1:])  # the seed reached the model


def test_model_factory_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a prompt\n")
    (tmp_path / "mypipes.py").write_text("def nothing():\n    return 42\n")
    for spec, message in (
        ("no_such_module_here:make", "calib: error: --model no_such_module_here:make: no module "
                                     "'no_such_module_here' (in the current folder or installed)"),
        ("mypipes:absent", "calib: error: --model mypipes:absent: module 'mypipes' has no function 'absent'"),
        ("mypipes:nothing", "calib: error: --model mypipes:nothing: nothing() returned int, not a pipeline with a "
                            "transformer"),
    ):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli("trace", "--model", spec, "--prompts", "p.txt")
        assert code == 2 and err.getvalue().strip().splitlines()[-1] == message
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["mypipes.py", "p.txt"]


def test_two_expert_wan_trace_fit_apply(tmp_path, monkeypatch):
    """Wan2.2 A14B end to end as a user runs it: `calib trace` labels which expert ran each step, `calib fit` fits
    each expert on its own steps and writes both polynomials keyed by component, and the runtime drives each expert
    with its own polynomial."""
    import json

    from calib.store import read_traces

    monkeypatch.chdir(tmp_path)
    steps = 10
    (tmp_path / "p.txt").write_text("a prompt\n")
    spec = f"{__name__}:tiny_wan_two_expert"
    assert cli("trace", "--model", spec, "--prompts", "p.txt", "--steps", str(steps), "--seeds", "0-2",
               "--guidance", str(GUIDANCE), "--out", "wan.h5") == 0

    pipe = tiny_wan_two_expert()
    pipe.scheduler.set_timesteps(steps)
    boundary = TWO_EXPERT_BOUNDARY * pipe.scheduler.config.num_train_timesteps
    high = [i for i, t in enumerate(pipe.scheduler.timesteps) if t >= boundary]
    low = [i for i in range(steps) if i not in high]
    assert len(high) >= 3 and len(low) >= 3

    traces = read_traces([tmp_path / "wan.h5"])
    assert traces.model_info["components"] == ["transformer", "transformer_2"]
    by_component = {"transformer": [], "transformer_2": []}
    for traj in traces.trajectories:
        by_component[traj.component].append(traj)
        assert list(traj.step_index) == (high if traj.component == "transformer" else low)
        check_series(traj, len(traj.step_index))
    assert [len(v) for v in by_component.values()] == [3 * 2, 3 * 2]  # 3 seeds x (cond, uncond) each

    assert cli("fit", "wan.h5", "--out", "wan.json", "--indicator", "modulated_input", "--normalization", "none",
               "--degree", "1", "--bootstrap", "0", "--no-plot") == 0
    doc = json.loads((tmp_path / "wan.json").read_text())
    assert set(doc["components"]) == {"transformer", "transformer_2"}
    for component, trajectories in by_component.items():
        # each polynomial is fitted on its own expert's points: its domain lies within that expert's inputs
        x = np.concatenate([t.input_rel_l1[1:] for t in trajectories])
        lo, hi = doc["components"][component]["domain"]
        assert x.min() <= lo < hi <= x.max(), (component, lo, hi, x.min(), x.max())
    assert doc["components"]["transformer"]["coefficients"] != doc["components"]["transformer_2"]["coefficients"]

    def run():
        return pipe("a prompt", num_inference_steps=steps, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(0)).images

    base = run()
    with cr.apply(pipe, cr.load(tmp_path / "wan.json"), threshold=0) as handle:
        assert torch.equal(run(), base)
        assert {t["component"] for t in handle.stats()["trajectories"]} == {"transformer", "transformer_2"}

    # Which polynomial drives which expert: one that never adds up (0) skips every middle step of its expert, one
    # that always exceeds the threshold computes them all; swapping the two swaps the experts' behaviour.
    for idle, busy in (("transformer", "transformer_2"), ("transformer_2", "transformer")):
        edited = json.loads(json.dumps(doc))
        edited["components"][idle]["coefficients"] = [0.0, 0.0]
        edited["components"][busy]["coefficients"] = [0.0, 1e6]
        (tmp_path / "edited.json").write_text(json.dumps(edited))
        with cr.apply(pipe, cr.load(tmp_path / "edited.json"), threshold=1.0) as handle:
            run()
            stats = {t["component"]: t for t in handle.stats()["trajectories"]}  # batched CFG: one stream each
        n = {"transformer": len(high), "transformer_2": len(low)}
        assert stats[busy]["skipped_steps"] == [] and stats[busy]["computed"] == n[busy]
        # an expert's first step computes; the generation's last step (the low-noise expert's last) computes
        last = n[idle] - 1 if idle == "transformer_2" else n[idle]
        assert stats[idle]["skipped_steps"] == list(range(1, last))


class MysteryTransformer(torch.nn.Module):
    def forward(self, hidden_states, timestep):
        return hidden_states


def test_unsupported_class_names_supported_ones_and_the_flag():
    pipe = SimpleNamespace(transformer=MysteryTransformer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    for attempt in (lambda: get_adapter(pipe.transformer), lambda: Tracer(pipe)):
        with pytest.raises(CalibError) as err:
            attempt()
        message = str(err.value)
        assert "MysteryTransformer" in message and "--modulation-module" in message
        for cls in ("FluxTransformer2DModel", "WanTransformer3DModel", "QwenImageTransformer2DModel"):
            assert cls in message


class _MysteryPipeline:
    def __init__(self):
        self.transformer = MysteryTransformer()
        self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler()

    def __call__(self, *args, **kwargs):
        raise AssertionError("an unsupported class must be refused before any generation")


def tiny_mystery_pipeline():
    return _MysteryPipeline()


def test_unsupported_class_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a prompt\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli("trace", "--model", f"{__name__}:tiny_mystery_pipeline", "--prompts", "p.txt", "--out", "m.h5")
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue()
    assert lines[0].startswith("calib: error: calib has no adapter for MysteryTransformer; supported: ")
    assert lines[0].endswith("For another class pass --modulation-module (e.g. --modulation-module "
                             "transformer_blocks.0.norm1)")
    from calib.adapters import supported_classes

    assert all(cls in lines[0] for cls in supported_classes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def test_custom_adapter_on_flux():
    pipe = stand_in("flux")
    adapter = custom_adapter("transformer_blocks.0.norm1")
    assert adapter.name == "custom" and adapter.indicator_name == "transformer_blocks.0.norm1"
    settings = TraceSettings(steps=STEPS, guidance=GUIDANCE, seeds=(0,))
    with Tracer(pipe, adapter) as tracer:
        custom = tracer.trace("a prompt", 0, settings)
    with Tracer(pipe, modulation_module="transformer_blocks.0.norm1") as tracer:
        flagged = tracer.trace("a prompt", 0, settings)
    with Tracer(pipe) as tracer:
        builtin = tracer.trace("a prompt", 0, settings)
    assert [t.block_names for t in custom] == [t.block_names for t in builtin]
    for a, b, c in zip(custom, flagged, builtin):
        np.testing.assert_array_equal(a.input_rel_l1, c.input_rel_l1)
        np.testing.assert_array_equal(b.input_rel_l1, c.input_rel_l1)
    base = generate(pipe)
    with cr.apply(pipe, make_config(pipe.transformer), threshold=0, modulation_module="transformer_blocks.0.norm1"):
        assert torch.equal(generate(pipe), base)


class MyFluxTransformer(diffusers.FluxTransformer2DModel):
    """A class calib has no adapter for (its blocks are FLUX's)."""


def test_modulation_module_for_an_unknown_class_traces_and_applies():
    family = FAMILIES["flux"]
    torch.manual_seed(0)
    pipe = StandInPipeline(family, MyFluxTransformer(**family.config).eval())
    with pytest.raises(CalibError, match="--modulation-module"):
        Tracer(pipe)
    with Tracer(pipe, modulation_module="transformer_blocks.0.norm1") as tracer:
        assert tracer.adapter.name == "custom"
        for traj in tracer.trace("a prompt", 0, TraceSettings(steps=STEPS, guidance=GUIDANCE, seeds=(0,))):
            check_series(traj, STEPS)
    # what `calib fit` writes for such a trace: adapter "custom", the layer as the indicator's name
    config = make_config(pipe.transformer, adapter="custom", indicator="transformer_blocks.0.norm1")
    base = generate(pipe)
    with cr.apply(pipe, config, threshold=0):
        assert torch.equal(generate(pipe), base)
    with cr.apply(pipe, config, threshold=1e9) as handle:
        generate(pipe)
        assert [t["computed"] for t in handle.stats()["trajectories"]] == [2]


class _ToyBlock(torch.nn.Module):
    def __init__(self, append: int = 0):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(8)
        self.proj = torch.nn.Linear(8, 8)
        self.append = append

    def forward(self, hidden_states, temb):
        out = hidden_states + self.proj(self.norm1(hidden_states) * (1 + temb[:, None]))
        if self.append:  # like a last block that also returns text tokens
            out = torch.cat([out, out[:, : self.append]], dim=1)
        return out


class ToyAppendingTransformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([_ToyBlock(), _ToyBlock(append=2)])

    def forward(self, hidden_states, timestep, return_dict=True):
        temb = torch.sin(timestep[:, None] / 100 + torch.arange(8))
        tokens = hidden_states.shape[1]
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, temb)
        return (hidden_states[:, :tokens],)


def test_stack_whose_output_shape_differs_is_traced_with_nan_residual_and_never_skipped():
    torch.manual_seed(0)
    pipe = StandInPipeline(Family("", {}, latent=(6, 8), text={}), ToyAppendingTransformer())
    with Tracer(pipe, modulation_module="transformer_blocks.0.norm1") as tracer:
        trajectories = tracer.trace("a prompt", 0, TraceSettings(steps=STEPS, guidance=GUIDANCE, seeds=(0,)))
    for traj in trajectories:
        assert np.isnan(traj.residual_rel_l1).all()
        assert np.isfinite(traj.input_rel_l1[1:]).all() and np.isfinite(traj.output_rel_l1[1:]).all()
    base = generate(pipe)
    with cr.apply(pipe, make_config(pipe.transformer), threshold=1e9,
                  modulation_module="transformer_blocks.0.norm1") as handle:
        assert torch.equal(generate(pipe), base)
        assert handle.stats()["skipped"] == 0


def test_tracer_recomputes_the_modulated_input_when_the_consumer_layer_gets_something_else():
    """An adapter whose consumer layer is fed another tensor (here Wan's cross-attention, fed norm2(x)): the first
    call's check catches it, the tracer warns once and recomputes, and the trace equals the correct adapter's."""
    pipe = stand_in("wan_t2v")
    good = get_adapter(pipe.transformer)
    wrong = dataclasses.replace(good, modulated_input_consumer="attn2")
    settings = TraceSettings(steps=STEPS, guidance=GUIDANCE, seeds=(0,))
    with Tracer(pipe, good) as tracer:
        expected = tracer.trace("a prompt", 0, settings)
    with pytest.warns(UserWarning, match="recomputes it every step") as caught, Tracer(pipe, wrong) as tracer:
        got = tracer.trace("a prompt", 0, settings)
        got_again = tracer.trace("a prompt", 0, settings)
    assert len([w for w in caught if "recomputes" in str(w.message)]) == 1
    assert tracer.recorders[0]._consumer_ok is False
    for trajectories in (got, got_again):
        for a, b in zip(expected, trajectories):
            np.testing.assert_array_equal(a.input_rel_l1, b.input_rel_l1)


@pytest.mark.parametrize("name", ["wan_t2v", "flux"])
def test_traced_changes_are_the_rel_l1_of_what_the_model_computed(name, monkeypatch):
    """The tracer's batched, deferred reductions give each block's and the output's rel-L1 change per batch row,
    against an independent computation from the same run's tensors; reducing after every call (the held stacks'
    memory cap), in chunks of any size, or tensor by tensor (large models) gives the same values bit for bit."""
    import calib.trace.recorder as trace_module
    from calib.hooking import rel_l1_rows

    pipe = stand_in(name)
    adapter = get_adapter(pipe.transformer)
    blocks = adapter.blocks(pipe.transformer)
    settings = TraceSettings(steps=STEPS, guidance=GUIDANCE, seeds=(0,))
    seen = {"output": [], **{i: [] for i in range(len(blocks))}}
    hooks = [pipe.transformer.register_forward_hook(lambda m, a, out: seen["output"].append(out[0].clone()))]
    for i, (_, block) in enumerate(blocks):
        io_ = adapter.block_io(block)
        hooks.append(block.register_forward_hook(
            lambda m, a, out, i=i, io_=io_: seen[i].append(io_.hidden_states_out(out).clone())))
    try:
        with Tracer(pipe) as tracer:
            traced = {t.stream: t for t in tracer.trace("a prompt", 0, settings)}
    finally:
        for h in hooks:
            h.remove()
    for row, stream in enumerate(adapter.cfg_batch_order):  # batched CFG: one call per step, rows by stream
        traj = traced[stream]
        for key, series in [("output", traj.output_rel_l1)] + [(i, traj.block_rel_l1[:, i]) for i in range(len(blocks))]:
            tensors = seen[key]
            expected = [float("nan")] + [float(rel_l1_rows(c, p)[row]) for p, c in zip(tensors, tensors[1:])]
            np.testing.assert_allclose(series, expected, rtol=1e-6, equal_nan=True, err_msg=str(key))

    for patch in ({"PENDING_NUMEL": 0}, {"REDUCE_NUMEL": 0}, {"REDUCE_NUMEL": 1 << 40}, {"BATCH_NUMEL": 0}):
        with monkeypatch.context() as m:
            for attr, value in patch.items():
                m.setattr(trace_module, attr, value)
            with Tracer(pipe) as tracer:
                again = {t.stream: t for t in tracer.trace("a prompt", 0, settings)}
        for stream, traj in traced.items():
            np.testing.assert_array_equal(again[stream].block_rel_l1, traj.block_rel_l1, err_msg=str(patch))
            np.testing.assert_array_equal(again[stream].output_rel_l1, traj.output_rel_l1, err_msg=str(patch))
            np.testing.assert_array_equal(again[stream].input_rel_l1, traj.input_rel_l1, err_msg=str(patch))
            for series, values in traj.extra.items():
                np.testing.assert_array_equal(again[stream].extra[series], values, err_msg=f"{patch} {series}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_held_calls_of_other_dtypes_are_reduced_in_float32(dtype):
    """A model in bf16 (or float64): the tracer's held copies are float32, and each change is that of the float32
    values, as ``rel_l1_rows`` computes it."""
    from calib.hooking import rel_l1_rows
    from calib.trace.recorder import PendingGroup

    gen = torch.Generator().manual_seed(0)
    calls = [[torch.randn(2, 3, 4, generator=gen).to(dtype) for _ in range(2)] for _ in range(3)]
    group, parts = PendingGroup(), [None] * 3
    for i, tensors in enumerate(calls):
        group.add([t.reshape(2, -1) for t in tensors], (parts, i))
    group.reduce()
    assert group.buffer.dtype == torch.float32 and torch.isnan(parts[0]).all()
    for i in (1, 2):
        expected = torch.stack([rel_l1_rows(c, p) for c, p in zip(calls[i], calls[i - 1])])
        assert torch.equal(parts[i], expected), (i, parts[i], expected)


def test_every_family_module_is_found_without_being_listed(monkeypatch):
    """The registry discovers the families: each module of calib/adapters (but the shared ones) defines an Adapter,
    and every class those adapters claim is supported; a user's adapter registered before the first look-up stays."""
    import importlib
    import pkgutil

    from calib.adapters import registry
    from calib.adapters.base import Adapter

    monkeypatch.setattr(registry, "_ADAPTERS", {})
    monkeypatch.setattr(registry, "_loaded", False)
    mine = registry.register(Adapter(name="mine", model_classes=("FluxTransformer2DModel",),
                                      modulation_module="transformer_blocks.0.norm1"))
    claimed = set()
    for info in pkgutil.iter_modules(importlib.import_module("calib.adapters").__path__):
        if info.name in registry.NOT_FAMILIES:
            continue
        module = importlib.import_module(f"calib.adapters.{info.name}")
        adapters = [v for v in vars(module).values() if isinstance(v, Adapter) and v.model_classes]
        assert adapters, f"calib/adapters/{info.name}.py defines no Adapter"
        claimed.update(c for a in adapters for c in a.model_classes)
    assert set(registry.supported_classes()) == claimed and len(claimed) >= 12
    assert registry.get_adapter("FluxTransformer2DModel") is mine
