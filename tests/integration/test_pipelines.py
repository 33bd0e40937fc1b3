"""The worker's pipeline calls on the real (tiny) model: img2img, tiled upscale, LoRA switching,
the identity stage's fallback and the cached style previews."""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chitrakar.config import Settings
from chitrakar.domain import GenerationPlan
from chitrakar.media import MediaStore
from chitrakar.presets import Preset
from chitrakar.styles import StyleCatalogue, load_catalogue
from workers import pipelines, previews
from workers.identity import ImageToImageIdentity, choose_identity_stage
from workers.pipelines import (
    LoadedPipeline,
    image_to_image,
    load_pipeline,
    start_pixels,
    text_to_image,
    tile_origins,
    upscale,
    use_lora,
)
from workers.tiny import make_tiny_lora

PLAN = GenerationPlan("a lighthouse", 64, 64, 4, (7,), 5.0)


@pytest.fixture(scope="module")
def loaded(tiny_model: Path) -> LoadedPipeline:
    return load_pipeline(str(tiny_model), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def lora_file(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lora(tiny_model, tmp_path_factory.mktemp("loras") / "style.safetensors")


def pixels(image: Image.Image) -> np.ndarray:  # type: ignore[type-arg]
    return np.asarray(image, dtype=np.int16)


def differ(a: Image.Image, b: Image.Image) -> bool:
    return bool(np.abs(pixels(a) - pixels(b)).mean() > 1.0)


def test_img2img_keeps_the_start_image_and_reports_its_own_steps(loaded: LoadedPipeline) -> None:
    start = Image.new("RGB", (80, 64), (200, 40, 40))
    seen: list[tuple[int, int]] = []
    plan = replace(PLAN, seeds=(1, 2), strength=0.5, steps=8)
    images = image_to_image(loaded, plan, start, lambda d, t: seen.append((d, t)))
    assert [image.size for image in images] == [(64, 64)] * 2
    # strength 0.5 of 8 steps runs 4 of them.
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # The start image shapes the result (the tiny model's random VAE keeps no likeness, so
    # the test compares two starts rather than looking for red).
    other = image_to_image(loaded, plan, Image.new("RGB", (80, 64), (20, 40, 220)))
    assert differ(images[0], other[0])
    assert not differ(images[0], image_to_image(loaded, plan, start)[0])
    # The img2img view shares the model's modules: no second copy of the weights.
    assert loaded.image2image.unet is loaded.text2image.unet


@pytest.mark.parametrize("channels_last", [False, True])
def test_img2img_gives_the_unet_latents_laid_out_as_text2image_does(
    channels_last: bool, loaded: LoadedPipeline, tiny_model: Path
) -> None:
    """A compiled UNet (and VAE decoder) checks its inputs' strides: img2img's latents were
    channels-last, from the processor's transposed view of a PIL image and from a
    channels-last VAE encoder, and every avatar, variation and upscale compiled the model
    again. The pixel values stay the processor's."""
    if channels_last:
        preset = Preset(name="cl", description="", dtype="float32", channels_last=True)
        loaded = load_pipeline(str(tiny_model), torch.device("cpu"), torch.float32, preset)
    layouts: list[tuple[int, ...]] = []
    hook = loaded.text2image.unet.register_forward_pre_hook(
        lambda _unet, args: layouts.append(args[0].stride())
    )
    start = Image.new("RGB", (64, 64), (200, 40, 40))
    try:
        text_to_image(loaded, replace(PLAN, steps=1))
        image_to_image(loaded, replace(PLAN, steps=2, strength=0.5), start)
    finally:
        hook.remove()
    assert len(layouts) == 2 and layouts[0] == layouts[1]
    processor = loaded.image2image.image_processor
    assert torch.equal(processor.preprocess(start_pixels(start)), processor.preprocess(start))


def test_img2img_of_a_one_step_plan_still_makes_its_images(loaded: LoadedPipeline) -> None:
    """A variation of a `/portrait --steps 1` (strength 0.55) and an upscale of a 3-step one
    (0.3): steps × strength rounds down to none, which made no image at all."""
    start = Image.new("RGB", (64, 64), (200, 40, 40))
    seen: list[tuple[int, int]] = []
    variation = replace(PLAN, seeds=(1, 2), steps=1, strength=0.55)
    images = image_to_image(loaded, variation, start, lambda d, t: seen.append((d, t)))
    assert [image.size for image in images] == [(64, 64)] * 2 and seen == [(1, 1)]
    (big,) = upscale(loaded, replace(PLAN, width=128, height=128, steps=3, strength=0.3), start, 64)
    assert big.size == (128, 128)


def test_img2img_needs_a_strength(loaded: LoadedPipeline) -> None:
    with pytest.raises(ValueError, match="strength"):
        image_to_image(loaded, PLAN, Image.new("RGB", (64, 64)))


@pytest.mark.parametrize(("length", "tile"), [(64, 64), (128, 64), (200, 64), (1024, 512)])
def test_tiles_cover_the_image_and_overlap(length: int, tile: int) -> None:
    overlap = tile // 8
    origins = tile_origins(length, tile, overlap)
    assert origins[0] == 0 and origins[-1] + tile == max(length, tile)
    for left, right in itertools.pairwise(origins):
        assert left < right <= left + tile - overlap


def test_upscale_doubles_by_tiles_with_progress_over_all_tiles(loaded: LoadedPipeline) -> None:
    start = Image.radial_gradient("L").convert("RGB").resize((64, 64))
    plan = replace(PLAN, width=128, height=128, steps=4, strength=0.5)
    seen: list[tuple[int, int]] = []
    (big,) = upscale(loaded, plan, start, tile=64, on_progress=lambda d, t: seen.append((d, t)))
    assert big.size == (128, 128)
    tiles = len(tile_origins(128, 64, 8)) ** 2
    assert seen[-1] == (2 * tiles, 2 * tiles)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    (other,) = upscale(loaded, plan, Image.linear_gradient("L").convert("RGB"), tile=64)
    assert differ(big, other)


def test_lora_is_loaded_once_and_switched_per_job(
    loaded: LoadedPipeline, lora_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = text_to_image(loaded, PLAN)[0]
    loads: list[str] = []
    original = loaded.text2image.load_lora_weights
    monkeypatch.setattr(
        loaded.text2image,
        "load_lora_weights",
        lambda path, **kw: (loads.append(path), original(path, **kw))[1],
    )
    unet = loaded.text2image.unet

    assert use_lora(loaded, str(lora_file), 1.0)
    styled = text_to_image(loaded, PLAN)[0]
    assert differ(plain, styled)
    assert not use_lora(loaded, None, 1.0)
    assert not differ(plain, text_to_image(loaded, PLAN)[0])
    assert use_lora(loaded, str(lora_file), 1.0)
    assert not differ(styled, text_to_image(loaded, PLAN)[0])

    assert loads == [str(lora_file)]
    assert loaded.text2image.unet is unet  # the base model was never loaded again
    use_lora(loaded, None, 1.0)


def test_a_missing_lora_is_logged_and_the_job_goes_on(
    loaded: LoadedPipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain = text_to_image(loaded, PLAN)[0]
    with caplog.at_level(logging.WARNING, logger=pipelines.__name__):
        assert not use_lora(loaded, str(tmp_path / "gone.safetensors"), 1.0)
    assert "does not exist" in caplog.text
    assert not differ(plain, text_to_image(loaded, PLAN)[0])


def test_identity_adapter_weights_absent_fall_back_to_img2img(
    loaded: LoadedPipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert isinstance(choose_identity_stage(Settings(), loaded), ImageToImageIdentity)
    settings = Settings(identity_adapter=tmp_path / "IP-Adapter")
    with caplog.at_level(logging.WARNING):
        stage = choose_identity_stage(settings, loaded)
    assert isinstance(stage, ImageToImageIdentity)
    assert "not found" in caplog.text
    # Weights present but unreadable: the same fallback, not a crash.
    broken = tmp_path / "IP-Adapter" / "models" / settings.identity_adapter_weights
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not weights")
    fallback = choose_identity_stage(settings, loaded)
    assert isinstance(fallback, ImageToImageIdentity)
    face = Image.new("RGB", (64, 64), "tan")
    images = fallback.avatars(loaded, replace(PLAN, strength=0.6), face, None)
    assert len(images) == 1


def two_styles() -> StyleCatalogue:
    catalogue = load_catalogue()
    keys = ("watercolour", "warli")
    return StyleCatalogue(
        defaults=catalogue.defaults.model_copy(update={"style": keys[0]}),
        styles={key: catalogue.styles[key].model_copy(update={"steps": 2}) for key in keys},
    )


def test_previews_are_made_once_per_model_and_style(
    loaded: LoadedPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalogue, media = two_styles(), MediaStore(tmp_path)
    made: list[str] = []
    real = previews.text_to_image
    monkeypatch.setattr(
        previews,
        "text_to_image",
        lambda loaded, plan, **kw: (made.append(plan.style), real(loaded, plan, **kw))[1],
    )

    grid = previews.make_preview_grid(loaded, catalogue, media, "tiny@64", 64)
    assert made == ["watercolour", "warli"]
    with Image.open(grid) as image:
        assert image.size == (previews.COLUMNS * previews.THUMBNAIL, previews.THUMBNAIL + 28)
    assert previews.make_preview_grid(loaded, catalogue, media, "tiny@64", 64) == grid
    assert made == ["watercolour", "warli"]

    # A changed style is drawn again; the other's preview is reused. Another model: all again.
    changed = catalogue.model_copy(
        update={
            "styles": {
                **catalogue.styles,
                "warli": catalogue.styles["warli"].model_copy(update={"guidance": 3.0}),
            }
        }
    )
    assert previews.make_preview_grid(loaded, changed, media, "tiny@64", 64) != grid
    assert made == ["watercolour", "warli", "warli"]
    previews.make_preview_grid(loaded, catalogue, media, "other@64", 64)
    assert made[3:] == ["watercolour", "warli"]
