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

import os
from dataclasses import dataclass, field
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


def t5_encoder(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=VOCAB_SIZE, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    torch.manual_seed(0)
    return T5EncoderModel(config).eval()


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
    # what the test passes the pipeline beyond prompt/steps/guidance/size (e.g. the image of an I2V pipeline)
    call_kwargs: Callable[[], dict] = field(default=dict)
    loads_from_folder: bool = True  # False: only through `--model module:function` (the reason is in `note`)
    note: str = ""

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


def build(name: str):
    """The pipeline of family ``name``, built in memory."""
    return FAMILIES[name].build()


def save(name: str, folder) -> Path:
    """Build family ``name`` and write it as a diffusers pipeline folder (safetensors)."""
    folder = Path(folder)
    build(name).save_pretrained(str(folder), safe_serialization=True)
    return folder
