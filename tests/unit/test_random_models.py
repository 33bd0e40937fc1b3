"""The full-size random pipelines have the real architectures: parameter counts on the meta
device (no memory) and a tokenizer of CLIP's exact vocabulary size and layout. And the folder
a made model goes to replaces only a model made before, never someone's files."""

from __future__ import annotations

import json
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
from workers.tiny import MODEL_MARKER, CannotWriteModel, made_arch, write_model_folder

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


# --- the folder a made model is written to (make-tiny and make-random) ---


def _save_a_file(folder: Path) -> None:
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")


def test_a_model_is_written_marked_and_replaces_only_a_model_we_wrote(tmp_path: Path) -> None:
    target = write_model_folder(tmp_path / "models" / "tiny", "tiny", 3, _save_a_file)
    assert target == (tmp_path / "models" / "tiny").resolve()
    assert made_arch(target) == "tiny"
    assert json.loads((target / MODEL_MARKER).read_text()) == {"arch": "tiny", "seed": 3}
    assert oct((target / "model_index.json").stat().st_mode & 0o777) == "0o644"
    # Written again over itself: replaced whole, nothing left beside it.
    (target / "stale.bin").write_text("old")
    write_model_folder(target, "sd15", 4, _save_a_file)
    assert made_arch(target) == "sd15" and not (target / "stale.bin").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]


@pytest.mark.parametrize(
    "marker", [None, "not json", "{}", '{"arch": 15}'], ids=["none", "garbage", "empty", "number"]
)
def test_someone_elses_folder_is_never_replaced(tmp_path: Path, marker: str | None) -> None:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.txt").write_text("important")
    if marker is not None:
        (folder / MODEL_MARKER).write_text(marker)
    saves: list[Path] = []
    with pytest.raises(CannotWriteModel, match="exists and is not a model chitrakar wrote"):
        write_model_folder(folder, "tiny", 0, saves.append)
    assert saves == []  # refused before anything was built
    assert (folder / "chapter1.txt").read_text() == "important"
    assert made_arch(folder) is None


def test_an_unwritable_place_is_found_before_the_model_is_built(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    saves: list[Path] = []
    with pytest.raises(CannotWriteModel) as refused:
        write_model_folder(tmp_path / "a-file" / "model", "sdxl", 0, saves.append)
    assert saves == []
    assert str(refused.value).startswith(f"cannot write the model to {tmp_path}/a-file/model: ")


def test_a_build_that_fails_leaves_the_earlier_model_and_no_leftovers(tmp_path: Path) -> None:
    target = write_model_folder(tmp_path / "tiny", "tiny", 0, _save_a_file)

    def full_disk(folder: Path) -> None:
        _save_a_file(folder)
        raise OSError(28, "No space left on device")

    with pytest.raises(CannotWriteModel, match="No space left on device"):
        write_model_folder(target, "tiny", 1, full_disk)
    assert json.loads((target / MODEL_MARKER).read_text())["seed"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
