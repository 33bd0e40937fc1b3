"""Randomly initialised Stable Diffusion 1.5 and SDXL pipelines at their real, full size.

No weights can be downloaded here, yet speed and memory on a GPU are worth measuring: a network
with random weights costs the same compute and memory as a trained one of the same shape. So
`make_random` writes a diffusers folder whose every component has the exact configuration of
runwayml/stable-diffusion-v1-5 or stabilityai/stable-diffusion-xl-base-1.0 (the configs below
are those repositories' config.json values, checked against public copies) and random weights.
Its images are noise.

The tokenizers are written by hand: a byte-level CLIP vocabulary of exactly 49,408 entries,
laid out as the real one is (bytes, their `</w>` forms, merges, then `<|startoftext|>` = 49406
and `<|endoftext|>` = 49407), so every token id fits the real embedding table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from workers.tiny import _BOS, _EOS, _byte_alphabet, write_model_folder

Arch = Literal["sd15", "sdxl"]

CLIP_VOCAB_SIZE = 49408
# SDXL's tokenizer_2 pads with "!" (id 0), as OpenCLIP did in training, not with <|endoftext|>.
SDXL_SECOND_PAD = "!"

# Parameter counts of the real checkpoints' components, which `parameter_counts` reproduces from
# the configs below. SD 1.5's UNet count is the example in diffusers' `ModelMixin.num_parameters`
# docstring; the others are the counts public scripts print for the loaded real models (VAE and
# CLIP ViT-L/14 text tower, shared by both; SDXL's UNet; OpenCLIP ViT-bigG/14's text tower with
# its projection, also SD3's text_encoder_2).
ARCH_PARAMETERS: dict[str, dict[str, int]] = {
    "sd15": {
        "unet": 859_520_964,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
    },
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}

# runwayml/stable-diffusion-v1-5: unet/config.json.
_SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json (the keys that differ from the
# defaults; the others there are diffusers' defaults).
_SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# vae/config.json of both; SDXL's adds force_upcast (its VAE overflows in fp16), its own
# latent scaling factor and a 1024 sample size.
_SD15_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_SDXL_VAE: dict[str, Any] = {
    **_SD15_VAE,
    "force_upcast": True,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}

# text_encoder/config.json of both (OpenAI CLIP ViT-L/14's text tower). The odd special token
# ids (0, 2, 1) are the real config's; pooling uses the legacy argmax-of-ids rule because of them.
_CLIP_L: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": CLIP_VOCAB_SIZE,
}
# SDXL's text_encoder_2/config.json (OpenCLIP ViT-bigG/14's text tower with its projection).
_OPENCLIP_BIGG: dict[str, Any] = {
    **_CLIP_L,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

# scheduler/scheduler_config.json of each. Read with from_config, as from the real files: the
# keys a scheduler does not take (clip_sample for PNDM, say) are dropped silently.
_SD15_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
_SDXL_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "clip_sample": False,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary of exactly CLIP's size and layout, and its merges.

    The merges are made up (letter pairs, then letter triples, then any byte pairs, until the
    vocabulary is full): they only need to be valid, so prompts split into about as many tokens
    as with the real tokenizer rather than one per character."""
    alphabet = _byte_alphabet()
    vocab = {token: i for i, token in enumerate(alphabet + [f"{ch}</w>" for ch in alphabet])}
    merges: list[tuple[str, str]] = []
    wanted = CLIP_VOCAB_SIZE - len(vocab) - 2  # the two special tokens come last
    letters = "abcdefghijklmnopqrstuvwxyz"

    def candidates() -> Iterator[tuple[str, str]]:
        for left in letters:
            for right in letters:
                yield left, right
                yield left, f"{right}</w>"
        for first in letters:
            for second in letters:
                for right in letters:
                    yield first + second, right
                    yield first + second, f"{right}</w>"
        for left in alphabet:
            for right in alphabet:
                yield left, right
                yield left, f"{right}</w>"

    for left, right in candidates():
        if len(merges) == wanted:
            break
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    assert len(vocab) == CLIP_VOCAB_SIZE and vocab[_BOS] == 49406 and vocab[_EOS] == 49407
    return vocab, merges


def make_tokenizer(pad_token: str = _EOS) -> Any:
    """A CLIPTokenizer of CLIP's vocabulary size. SD 1.5's and SDXL's first tokenizer pad with
    `<|endoftext|>`; SDXL's second with SDXL_SECOND_PAD, as the real tokenizer_2 does."""
    vocab, merges = _clip_vocab()
    return CLIPTokenizer(
        vocab=vocab,
        # tokenizers' BPE takes (left, right) pairs; transformers annotates this as list[str].
        merges=cast(Any, merges),
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_EOS,
        pad_token=pad_token,
        model_max_length=77,
    )


def write_clip_vocab_files(folder: Path) -> None:
    """Add vocab.json and merges.txt, as the real repositories have, beside tokenizer.json:
    transformers 4.x's CLIPTokenizer (named in model_index.json) reads only those."""
    vocab, merges = _clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", "utf-8")


def _models(arch: Arch) -> dict[str, Any]:
    """The networks of `arch`, built under whatever device/dtype context the caller set."""
    if arch == "sd15":
        return {
            "unet": UNet2DConditionModel(**_SD15_UNET),
            "vae": AutoencoderKL(**_SD15_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**_CLIP_L)),
        }
    if arch == "sdxl":
        return {
            "unet": UNet2DConditionModel(**_SDXL_UNET),
            "vae": AutoencoderKL(**_SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**_CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**_OPENCLIP_BIGG)),
        }
    raise ValueError(f"unknown architecture {arch!r}")


def parameter_counts(arch: Arch) -> dict[str, int]:
    """Parameters per component of `arch`, counted on the meta device (no memory is used)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        models = _models(arch)
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Built directly in the target dtype: SDXL's UNet alone is 10 GB in fp32, 5 GB in fp16.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random(arch: Arch, dtype: torch.dtype = torch.float16, seed: int = 0) -> Any:
    """The pipeline of `arch`, full size, with random weights in `dtype` (in memory)."""
    # fork_rng: the seed makes the weights reproducible without moving the caller's RNG.
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
        torch.manual_seed(seed)
        models = _models(arch)
    for model in models.values():
        model.to(dtype=dtype).eval()  # catches any module that made float32 tensors itself
    if arch == "sd15":
        return StableDiffusionPipeline(
            **models,
            tokenizer=make_tokenizer(),
            scheduler=PNDMScheduler.from_config(_SD15_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        **models,
        tokenizer=make_tokenizer(),
        tokenizer_2=make_tokenizer(pad_token=SDXL_SECOND_PAD),
        scheduler=EulerDiscreteScheduler.from_config(_SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def make_random(arch: Arch, path: Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Write the full-size random pipeline of `arch` to `path` (a diffusers folder that
    `AutoPipelineForText2Image.from_pretrained` loads; see `write_model_folder`) and return
    it. SD 1.5 takes about 2.1 GB on disk in fp16 (20 s on 2 CPU cores), SDXL 6.9 GB (50 s,
    7.3 GB peak RSS)."""

    def save(folder: Path) -> None:
        pipe = build_random(arch, dtype=dtype, seed=seed)
        pipe.save_pretrained(str(folder), safe_serialization=True)
        del pipe
        for name in ("tokenizer", "tokenizer_2"):
            if (folder / name).is_dir():
                write_clip_vocab_files(folder / name)

    return write_model_folder(path, arch, seed, save)
