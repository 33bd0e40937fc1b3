"""The full-size random pipelines have the real architectures: parameter counts on the meta
device (no memory) and a tokenizer of CLIP's exact vocabulary size and layout."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from workers.random_models import (
    ARCH_PARAMETERS,
    CLIP_VOCAB_SIZE,
    SDXL_SECOND_PAD,
    Arch,
    make_tokenizer,
    parameter_counts,
    write_clip_vocab_files,
)

# The real checkpoints' parameter counts. SD 1.5 (runwayml/stable-diffusion-v1-5): UNet
# 859,520,964 (the example in diffusers' `ModelMixin.num_parameters` docstring), VAE 83,653,863,
# CLIP ViT-L/14 text encoder 123,060,480. SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0):
# UNet 2,567,463,684, the same VAE and ViT-L text encoder, and OpenCLIP ViT-bigG/14's text tower
# with projection 694,659,840. The non-docstring numbers are as printed for the loaded real
# models by public scripts (training logs, memory tables) found by searching GitHub.
REAL = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_parameter_counts_are_the_real_architectures(arch: Arch) -> None:
    assert parameter_counts(arch) == REAL[arch]
    assert ARCH_PARAMETERS[arch] == REAL[arch]


def test_tokenizer_has_clips_vocabulary_size_and_special_ids() -> None:
    tokenizer = make_tokenizer()
    assert len(tokenizer) == CLIP_VOCAB_SIZE == 49408
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 49407
    ids = tokenizer("a cinematic portrait").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    assert all(0 <= i < 49408 for i in ids)
    # The merges make words into fewer tokens than characters, as the real vocabulary does.
    assert len(ids) < len("acinematicportrait") + 2
    padded = tokenizer("a cinematic portrait", padding="max_length").input_ids
    assert len(padded) == 77


def test_sdxls_second_tokenizer_pads_with_exclamation_mark() -> None:
    assert SDXL_SECOND_PAD == "!"
    tokenizer = make_tokenizer(pad_token=SDXL_SECOND_PAD)
    assert tokenizer.pad_token_id == 0  # "!" is the first byte token, as in the real vocabulary
    assert tokenizer("a", padding="max_length").input_ids[-1] == 0


def test_vocab_files_give_the_same_tokenizer(tmp_path: Path) -> None:
    write_clip_vocab_files(tmp_path)
    from_files = CLIPTokenizer.from_pretrained(str(tmp_path))
    prompt = "a cinematic portrait of an old fisherman, golden hour, 85mm, हिन्दी"
    assert len(from_files) == CLIP_VOCAB_SIZE
    assert from_files(prompt).input_ids == make_tokenizer()(prompt).input_ids
