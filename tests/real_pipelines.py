"""Real diffusers pipelines, built offline from tiny configs with random weights, for tests.

Every builder returns an instance of the real pipeline class of diffusers (``FluxPipeline``, ``WanPipeline``, ...)
with a tiny transformer, VAE and text encoder(s) built from their config classes, and tokenizers made in code with
the ``tokenizers`` library, so nothing is downloaded. ``save(family, folder)`` writes one as a diffusers folder
(``save_pretrained``, safetensors) that ``calib trace --model FOLDER`` loads like any downloaded model.

``FAMILIES[name]`` says how to build and call each one: the call settings a test passes (height, width, frames,
guidance) keep every generation under a second on a CPU core. Sizes follow diffusers' own pipeline tests
(``tests/pipelines/<family>/``), except where a pipeline's *default* arguments (``max_sequence_length``, prompt
templates) must work, because ``calib trace`` calls the pipeline with its defaults.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

# One token per byte: every prompt template of every pipeline (Qwen-Image drops its first 34 template tokens,
# HunyuanVideo its first 95) tokenizes to at least as many tokens as the pipeline crops, whatever the prompt.
_SPECIALS = ("<pad>", "</s>", "<s>", "<unk>")
_NUM_BYTE_TOKENS = 256
VOCAB_SIZE = 320  # byte tokens + specials, with room for ids a text-encoder config wants to name (vision tokens)
PAD_ID, EOS_ID, BOS_ID, UNK_ID = range(_NUM_BYTE_TOKENS, _NUM_BYTE_TOKENS + len(_SPECIALS))


def byte_tokenizer(model_max_length: int = 512, *, add_bos_eos: bool = False, padding_side: str = "right"):
    """A byte-level BPE tokenizer made in code (no download), wrapped as transformers' fast tokenizer.

    The merges join a few frequent English pairs so the BPE model really merges (transformers 5 wants them as
    tuples); the merged tokens take ids after the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for i, tok in enumerate(_SPECIALS):
        vocab[tok] = _NUM_BYTE_TOKENS + i
    merges = [("t", "h"), ("e", "r"), ("i", "n"), ("a", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos_eos:  # CLIP pools the text at its end-of-text token: every sequence must have one
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side=padding_side,
    )


def clip_text_encoder(hidden_size: int = 32, with_projection: bool = False, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, projection_dim=projection_dim, max_position_embeddings=77,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, hidden_act="gelu",
    )
    torch.manual_seed(0)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def t5_encoder(d_model: int = 32, umt5: bool = False):
    """T5's encoder; ``umt5``: the multilingual variant Wan's pipelines name (same layout, per-layer position bias)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        vocab_size=VOCAB_SIZE, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    torch.manual_seed(0)
    return model_class(config).eval()


def gemma2_encoder(hidden_size: int = 8, head_dim: int = 4):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=16, head_dim=head_dim,
        num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2, sliding_window=4,
        max_position_embeddings=4096, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return Gemma2Model(config).eval()


def kl_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


# ---------------------------------------------------------------------------------------------------- builders


def build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=kl_vae(latent_channels=1),
        text_encoder=clip_text_encoder(32),
        tokenizer=byte_tokenizer(77, add_bos_eos=True),
        text_encoder_2=t5_encoder(32),
        tokenizer_2=byte_tokenizer(512),
        transformer=transformer.eval(),
    )


def build_qwenimage():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": VOCAB_SIZE,
            "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=VOCAB_SIZE,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        # ids past the byte and merge tokens, so a prompt never looks like it holds an image
        vision_start_token_id=VOCAB_SIZE - 3, vision_end_token_id=VOCAB_SIZE - 2, vision_token_id=VOCAB_SIZE - 1,
        image_token_id=VOCAB_SIZE - 1, video_token_id=VOCAB_SIZE - 1,
    )
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return QwenImagePipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=byte_tokenizer(2048),
    )



def _wan_transformer(in_channels: int = 16, image_dim: int | None = None, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
    ).eval()


def build_wan_t2v():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=byte_tokenizer(512), text_encoder=t5_encoder(32, umt5=True), vae=wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=_wan_transformer(),
    )


def build_wan_i2v():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        intermediate_size=16, patch_size=2,
    )).eval()
    return WanImageToVideoPipeline(
        tokenizer=byte_tokenizer(512), text_encoder=t5_encoder(32, umt5=True), vae=wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_processor=CLIPImageProcessor(crop_size=16, size=16), image_encoder=image_encoder,
        # 16 noise + 4 mask + 16 image-latent channels
        transformer=_wan_transformer(in_channels=36, image_dim=4),
    )


def build_wan22_two_experts():
    """Wan2.2 A14B's layout: ``transformer`` (high noise) above the boundary, ``transformer_2`` (low noise) below."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    return WanPipeline(
        tokenizer=byte_tokenizer(512), text_encoder=t5_encoder(32, umt5=True), vae=wan_vae(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=_wan_transformer(seed=0), transformer_2=_wan_transformer(seed=1),
        # 6 steps of shift-3 flow sigmas: the first two run on `transformer`, the other four on `transformer_2`
        boundary_ratio=0.875,
    )


def build_hunyuan_video():
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from diffusers import HunyuanVideoTransformer3DModel
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    torch.manual_seed(0)
    llama = LlamaModel(LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, hidden_act="gelu",
    )).eval()
    return HunyuanVideoPipeline(
        # the default prompt template is cropped at its 95th token; the byte tokenizer gives it ~500
        text_encoder=llama, tokenizer=byte_tokenizer(1024),
        transformer=transformer.eval(), vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip_text_encoder(8), tokenizer_2=byte_tokenizer(77, add_bos_eos=True),
    )


def build_cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=2, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226,  # the pipeline's default max_sequence_length
    )
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(
        tokenizer=byte_tokenizer(512), text_encoder=t5_encoder(32), vae=vae.eval(),
        transformer=transformer.eval(), scheduler=CogVideoXDDIMScheduler(),
    )


def build_ltx():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=2, caption_channels=32,
    )
    torch.manual_seed(0)
    # every decoder size is given: its defaults are the full model's (a 905 MB "tiny" folder)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=t5_encoder(32),
        tokenizer=byte_tokenizer(512), transformer=transformer.eval(),
    )


def build_mochi():
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=256,  # the pipeline's default max_sequence_length
    )
    torch.manual_seed(0)
    vae = AutoencoderKLMochi(  # its group norms take 32 groups: 32 channels is the least
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
    )
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=t5_encoder(32),
        tokenizer=byte_tokenizer(512), transformer=transformer.eval(),
    )


def build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(latent_channels=4),
        text_encoder=clip_text_encoder(32, with_projection=True), tokenizer=byte_tokenizer(77, add_bos_eos=True),
        text_encoder_2=clip_text_encoder(32, with_projection=True), tokenizer_2=byte_tokenizer(77, add_bos_eos=True),
        text_encoder_3=t5_encoder(32), tokenizer_3=byte_tokenizer(512),
    )


def build_lumina2():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=2, num_attention_heads=1,
        num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2], cap_feat_dim=8,
    )
    return Lumina2Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(latent_channels=4),
        text_encoder=gemma2_encoder(hidden_size=8), tokenizer=byte_tokenizer(1024),
    )


def build_sana():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        # 16 selects the pipeline's 512-px resolution bins (it bins by default); a 32x DC-AE makes that 16x16 latents
        sample_size=16,
    )
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock",) * 6,
        decoder_block_types=("ResBlock",) * 6, encoder_block_out_channels=(8,) * 6,
        decoder_block_out_channels=(8,) * 6, encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
        encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6, downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    return SanaPipeline(
        tokenizer=byte_tokenizer(4096), text_encoder=gemma2_encoder(hidden_size=8), vae=vae.eval(),
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def build_pixart_sigma():
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        # 32 selects the pipeline's 256-px resolution bins (it bins by default); an 8x VAE makes that 32x32 latents
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
        norm_num_groups=1,
    )
    return PixArtSigmaPipeline(
        tokenizer=byte_tokenizer(512), text_encoder=t5_encoder(32), vae=vae.eval(), transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(),
    )


class PassThroughSafetyChecker(torch.nn.Module):
    """Stands in for NVIDIA's Cosmos Guardrail (the ``cosmos_guardrail`` package and its downloaded models), which
    every Cosmos pipeline demands: it passes every prompt and frame."""

    def __init__(self):
        super().__init__()
        # the pipeline asks each component for its device and dtype (``_execution_device``)
        self.register_buffer("_where", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._where.device

    @property
    def dtype(self) -> torch.dtype:
        return self._where.dtype

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


def build_cosmos2_text2image():
    from diffusers import Cosmos2TextToImagePipeline, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = CosmosTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2,
        text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        # the released models concatenate a padding mask, which the transformer resizes with torchvision (not a
        # dependency here); it widens only the patch embedding's input, not the blocks calib hooks
        concat_padding_mask=False, extra_pos_embed_type="learnable",
    )
    return Cosmos2TextToImagePipeline(
        text_encoder=t5_encoder(32), tokenizer=byte_tokenizer(512), transformer=transformer.eval(), vae=wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), safety_checker=PassThroughSafetyChecker(),
    )


def cosmos2_text2image():
    """``--model real_pipelines:cosmos2_text2image``: a Cosmos folder cannot load offline (its pipeline builds the
    Guardrail, which downloads its models, when the folder has none), so the CLI gets it from this factory."""
    return build_cosmos2_text2image()


def with_image(pipe, image):
    """``pipe`` with its conditioning image bound: calib passes a pipeline only JSON arguments (it records them), and
    an image-to-video pipeline needs a PIL image or tensor. The instance's class becomes a subclass of its own class
    whose ``__call__`` adds ``image=`` and runs the original, so every line that generates is diffusers'."""
    base = type(pipe)

    class WithImage(base):
        @functools.wraps(base.__call__)
        def __call__(self, *args, **kwargs):
            kwargs.setdefault("image", image)
            return base.__call__(self, *args, **kwargs)

    WithImage.__name__ = WithImage.__qualname__ = base.__name__
    pipe.__class__ = WithImage
    return pipe


def wan_i2v_with_image():
    """``--model real_pipelines:wan_i2v_with_image``: the tiny WanImageToVideoPipeline with a fixed 16x16 image."""
    from PIL import Image

    return with_image(build_wan_i2v(), Image.new("RGB", (16, 16), (120, 80, 200)))


# ---------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Family:
    """How to build one real pipeline and how a test calls it (``calib trace`` options and pipeline kwargs)."""

    name: str
    pipeline_class: str
    build: Callable
    height: int
    width: int
    num_frames: int | None = None
    guidance: float = 3.0
    variant: str = ""  # what sets this build apart from another of the same class (the docs table shows it)
    factory: str | None = None  # `--model module:function` for a pipeline that cannot load from a folder offline
    note: str = ""  # why the test drives it another way than `calib trace --model FOLDER`

    def trace_options(self) -> list[str]:
        opts = ["--height", str(self.height), "--width", str(self.width), "--guidance", str(self.guidance)]
        if self.num_frames is not None:
            opts += ["--num-frames", str(self.num_frames)]
        return opts

    def size_kwargs(self) -> dict:
        kw = {"height": self.height, "width": self.width}
        if self.num_frames is not None:
            kw["num_frames"] = self.num_frames
        return kw


FAMILIES: dict[str, Family] = {}


def _register(family: Family) -> None:
    FAMILIES[family.name] = family


_register(Family("flux", "FluxPipeline", build_flux, height=16, width=16, guidance=3.5))
_register(Family("qwenimage", "QwenImagePipeline", build_qwenimage, height=32, width=32, guidance=1.0))
_register(Family("wan_t2v", "WanPipeline", build_wan_t2v, height=32, width=32, num_frames=9, guidance=5.0))
_register(Family(
    "wan_i2v", "WanImageToVideoPipeline", build_wan_i2v, height=16, width=16, num_frames=9, guidance=5.0,
    variant="an image (bound by a factory)", factory="real_pipelines:wan_i2v_with_image",
    note="needs an `image`, which calib cannot pass (it passes JSON arguments only): a factory binds one",
))
_register(Family("wan22", "WanPipeline", build_wan22_two_experts, height=32, width=32, num_frames=9, guidance=4.0,
                 variant="`transformer_2`, boundary_ratio 0.875"))
_register(Family("hunyuan_video", "HunyuanVideoPipeline", build_hunyuan_video, height=16, width=16, num_frames=9,
                 guidance=6.0))
_register(Family("cogvideox", "CogVideoXPipeline", build_cogvideox, height=16, width=16, num_frames=9, guidance=6.0))
_register(Family("ltx", "LTXPipeline", build_ltx, height=32, width=32, num_frames=9, guidance=3.0))
_register(Family("mochi", "MochiPipeline", build_mochi, height=16, width=16, num_frames=7, guidance=4.5))
_register(Family("sd3", "StableDiffusion3Pipeline", build_sd3, height=16, width=16, guidance=5.0))
_register(Family("lumina2", "Lumina2Pipeline", build_lumina2, height=32, width=32, guidance=4.0))
_register(Family("sana", "SanaPipeline", build_sana, height=512, width=512, guidance=4.5))
_register(Family("pixart_sigma", "PixArtSigmaPipeline", build_pixart_sigma, height=256, width=256, guidance=4.5))
_register(Family(
    "cosmos2_text2image", "Cosmos2TextToImagePipeline", build_cosmos2_text2image, height=32, width=32,
    guidance=7.0, variant="a pass-through safety checker (a factory)", factory="real_pipelines:cosmos2_text2image",
    note="a saved folder loads only with NVIDIA's Guardrail (downloads): traced as --model real_pipelines:cosmos2_text2image",
))


def build(name: str):
    """The pipeline of family ``name``, built in memory."""
    return FAMILIES[name].build()


def save(name: str, folder) -> Path:
    """Build family ``name`` and write it as a diffusers pipeline folder (safetensors)."""
    folder = Path(folder)
    build(name).save_pretrained(str(folder), safe_serialization=True)
    return folder


# ---------------------------------------------------------------------------------------------------- counting

# The block lists of the families; the recorder below watches a layer inside the last block of the last list
# present, which runs only when a call computes its block stack. (A cache may still call the block module itself on a
# skipped step, to pass its inputs through, so the block's own hooks would fire either way.)
_STACK_NAMES = ("single_transformer_blocks", "transformer_blocks", "blocks", "layers")


def _inside_last_block(transformer: torch.nn.Module) -> torch.nn.Module:
    for name in _STACK_NAMES:
        stack = getattr(transformer, name, None)
        if isinstance(stack, torch.nn.ModuleList) and len(stack):
            return next(m for m in stack[-1].children() if any(True for _ in m.parameters()))
    raise AssertionError(f"{type(transformer).__name__} has none of {_STACK_NAMES}")


@dataclass
class Call:
    """One call of a denoiser, as the pipeline made it."""

    step: int
    component: str
    context: str | None  # the innermost `transformer.cache_context(...)` name around the call
    rows: int  # batch rows of hidden_states
    text: torch.Tensor | None  # encoder_hidden_states, to tell the prompt's rows from the negative prompt's
    computed: bool = False  # the last block's layers ran


class CallRecorder:
    """Counts how a pipeline calls its transformer(s), without calib: per step (one ``scheduler.step`` each), every
    call's component, ``cache_context`` name, batch rows and text conditioning, and whether its blocks ran.

    The ``cache_context`` wrapper is an instance attribute over the CacheMixin method the pipelines call as
    ``self.transformer.cache_context("cond")``; it calls the original, so diffusers' hooks see the same context."""

    def __init__(self, pipe):
        import contextlib

        self.calls: list[Call] = []
        self.step = 0
        self._undo: list[Callable] = []
        for name in ("transformer", "transformer_2"):
            module = getattr(pipe, name, None)
            if not isinstance(module, torch.nn.Module):
                continue
            stack: list[str] = []
            original = getattr(module, "cache_context", None)  # SD3's transformer has none (no CacheMixin)

            @contextlib.contextmanager
            def cache_context(context_name, _original=original, _stack=stack, **kwargs):
                _stack.append(context_name)
                try:
                    with _original(context_name, **kwargs):
                        yield
                finally:
                    _stack.pop()

            if original is not None:
                module.cache_context = cache_context
                self._undo.append(lambda m=module: vars(m).pop("cache_context", None))

            def before(mod, args, kwargs, _name=name, _stack=stack):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                text = kwargs.get("encoder_hidden_states")
                self.calls.append(Call(self.step, _name, _stack[-1] if _stack else None, int(hidden.shape[0]),
                                       text.detach().clone() if isinstance(text, torch.Tensor) else None))

            def ran(mod, args, output):
                self.calls[-1].computed = True

            hooks = [module.register_forward_pre_hook(before, with_kwargs=True),
                     _inside_last_block(module).register_forward_hook(ran)]
            self._undo.extend(h.remove for h in hooks)
        scheduler = pipe.scheduler
        step, set_timesteps = scheduler.step, scheduler.set_timesteps

        # functools.wraps keeps the signatures, which diffusers' retrieve_timesteps inspects
        @functools.wraps(step)
        def counted_step(*args, **kwargs):
            out = step(*args, **kwargs)
            self.step += 1
            return out

        @functools.wraps(set_timesteps)
        def new_generation(*args, **kwargs):
            self.calls, self.step = [], 0
            return set_timesteps(*args, **kwargs)

        scheduler.step, scheduler.set_timesteps = counted_step, new_generation
        self._undo.append(lambda: [vars(scheduler).pop(n, None) for n in ("step", "set_timesteps")])

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def row_labels(self, call: Call, prompt_text: torch.Tensor | None) -> list[str]:
        """``cond`` for the rows conditioned on the prompt (equal to ``prompt_text``, the text a guidance-free run of
        the same prompt passed), ``uncond`` for the others."""
        if call.text is None or prompt_text is None:
            return ["cond"] * call.rows
        return ["cond" if call.text[r].shape == prompt_text[0].shape and torch.equal(call.text[r], prompt_text[0])
                else "uncond" for r in range(call.rows)]


def generate(pipe, family: Family, prompt: str, *, steps: int, seed: int = 0, guidance: float | None = None,
             **kwargs) -> torch.Tensor:
    """One generation with the settings ``calib trace`` uses for ``family`` (latents out)."""
    out = pipe(
        prompt=prompt, num_inference_steps=steps,
        guidance_scale=family.guidance if guidance is None else guidance,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
        **family.size_kwargs(), **kwargs,
    )
    result = getattr(out, "frames", None)
    return (out.images if result is None else result).detach().clone()


@dataclass
class CallPattern:
    """How a pipeline called its transformer(s) in one generation, counted by :class:`CallRecorder`."""

    calls: list[Call]
    labels: list[list[str]]  # per call, per batch row: cond / uncond
    transformer_class: str = ""

    def streams(self) -> dict[tuple[str, str], list[int]]:
        """(component, stream) -> the steps it ran, as calib should record them: a call under a cond/uncond
        cache_context is that stream; a batched CFG call is one stream per row."""
        out: dict[tuple[str, str], list[int]] = {}
        for call, labels in zip(self.calls, self.labels):
            for label in labels:
                out.setdefault((call.component, label), []).append(call.step)
        return out

    def components(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for call in self.calls:
            steps = out.setdefault(call.component, [])
            if not steps or steps[-1] != call.step:
                steps.append(call.step)
        return out

    def per_step(self) -> list[tuple[str | None, int, tuple[str, ...]]]:
        """The calls of the first step, in order: (cache_context, rows, row labels)."""
        first = self.calls[0].step
        return [(c.context, c.rows, tuple(lab)) for c, lab in zip(self.calls, self.labels) if c.step == first]


def count_calls(pipe, family: Family, prompt: str, *, steps: int, seed: int = 0, **kwargs) -> CallPattern:
    """Run the pipeline as ``calib trace`` does and count its transformer calls; a second run with guidance off
    gives the prompt's own text conditioning, which tells cond rows from uncond rows."""
    with CallRecorder(pipe) as rec:
        generate(pipe, family, prompt, steps=steps, seed=seed, guidance=1.0,
                 **{k: v for k, v in kwargs.items() if k not in ("negative_prompt", "true_cfg_scale")})
        prompt_text = rec.calls[0].text
        generate(pipe, family, prompt, steps=steps, seed=seed, **kwargs)
        calls = list(rec.calls)
    return CallPattern(calls, [rec.row_labels(c, prompt_text) for c in calls], type(pipe.transformer).__name__)


# ---------------------------------------------------------------------------------------------------- the docs table


@dataclass
class TableRow:
    """One line of docs/model-families.md's table of real pipelines, from what a test measured."""

    pipeline: str  # the pipeline class
    call: str  # how it was called (guidance, true CFG)
    pattern: CallPattern  # counted without calib
    traced: list  # (component, stream) calib trace recorded
    runtime: list  # (component, stream) the runtime kept a state for


def _by_component(pairs) -> str:
    components: dict[str, list[str]] = {}
    for component, stream in pairs:
        components.setdefault(component, [])
        if stream not in components[component]:
            components[component].append(stream)
    if len(components) == 1:
        return ", ".join(f"`{s}`" for s in next(iter(components.values())))
    return "; ".join(f"`{c}`: " + ", ".join(f"`{s}`" for s in streams) for c, streams in components.items())


def table_cells(row: TableRow) -> list[str]:
    calls = row.pattern.per_step()
    components = row.pattern.components()
    count = str(len(calls))
    if len(components) > 1:
        count += " (" + ", ".join(f"`{c}` at steps {s[0]}–{s[-1]}" for c, s in components.items()) + ")"
    rows = ", ".join(f"{n} [{', '.join(labels)}]" for _, n, labels in calls)
    contexts = ", ".join(f"`{c}`" if c else "none" for c, _, _ in calls)
    return [f"`{row.pipeline}`", row.call, count, rows, contexts, _by_component(row.traced),
            _by_component(row.runtime)]


TABLE_HEADER = ["Pipeline", "Called with", "Transformer calls per step", "Batch rows per call [rows' text]",
                "`cache_context` per call", "Streams calib records", "Runtime states (per component)"]


def markdown_table(rows: list[TableRow]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
