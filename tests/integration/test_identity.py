"""The IP-Adapter identity stage on the real (tiny) model with a tiny, random IP-Adapter in
h94/IP-Adapter's layout: it loads offline, the face conditions avatars through it, and jobs
without a face are unchanged by it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chitrakar.config import Settings
from chitrakar.domain import GenerationPlan
from tests.support.botapi import BotApiEmulator
from tests.support.stack import worker_settings
from workers.identity import (
    IdentityStage,
    ImageToImageIdentity,
    IPAdapterIdentity,
    choose_identity_stage,
)
from workers.pipelines import (
    LoadedPipeline,
    image_to_image,
    load_pipeline,
    text_to_image,
    upscale,
)
from workers.runtime import WorkerRuntime
from workers.tiny import make_tiny_ip_adapter

WEIGHTS = "ip-adapter_sd15.safetensors"
PLAN = GenerationPlan("a portrait", 64, 64, 4, (1, 2), 5.0, strength=0.6)
FACE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
OTHER_FACE = Image.new("RGB", (96, 96), "tan")


def pixels(image: Image.Image) -> np.ndarray:  # type: ignore[type-arg]
    return np.asarray(image, dtype=np.int16)


def differ(a: Image.Image, b: Image.Image) -> bool:
    return bool(np.abs(pixels(a) - pixels(b)).mean() > 1.0)


def fresh(model: Path) -> LoadedPipeline:
    return load_pipeline(str(model), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_ip_adapter(tiny_model, tmp_path_factory.mktemp("IP-Adapter"))


@pytest.fixture(scope="module")
def plain(tiny_model: Path) -> LoadedPipeline:
    """The model with no adapter: what images are without one."""
    return fresh(tiny_model)


@pytest.fixture(scope="module")
def img2img_avatars(plain: LoadedPipeline) -> list[Image.Image]:
    return ImageToImageIdentity().avatars(plain, PLAN, FACE, None)


@pytest.fixture(scope="module")
def with_adapter(tiny_model: Path, adapter: Path) -> tuple[LoadedPipeline, IdentityStage]:
    loaded = fresh(tiny_model)
    settings = Settings(identity_adapter=adapter, identity_adapter_weights=WEIGHTS)
    return loaded, choose_identity_stage(settings, loaded)


def test_a_present_adapter_is_chosen_with_its_image_encoder(
    with_adapter: tuple[LoadedPipeline, IdentityStage],
) -> None:
    loaded, stage = with_adapter
    assert isinstance(stage, IPAdapterIdentity)
    # The tiny model has neither: load_ip_adapter read the encoder from models/image_encoder
    # and made a feature extractor for it, with no download.
    assert loaded.text2image.image_encoder is not None
    assert loaded.text2image.feature_extractor is not None


def test_avatars_through_the_adapter_follow_the_face(
    with_adapter: tuple[LoadedPipeline, IdentityStage], img2img_avatars: list[Image.Image]
) -> None:
    loaded, stage = with_adapter
    avatars = stage.avatars(loaded, PLAN, FACE, None)
    assert [image.size for image in avatars] == [(64, 64)] * 2
    # Same face, same seeds: only the adapter differs from img2img alone.
    assert all(differ(a, b) for a, b in zip(avatars, img2img_avatars, strict=True))
    others = stage.avatars(loaded, PLAN, OTHER_FACE, None)
    assert all(differ(a, b) for a, b in zip(avatars, others, strict=True))
    # The same start image with another image for the adapter: the stage gives it the face.
    swapped = image_to_image(loaded, PLAN, FACE, ip_adapter_image=OTHER_FACE)
    assert all(differ(a, b) for a, b in zip(avatars, swapped, strict=True))


def test_jobs_without_a_face_are_as_without_the_adapter(
    with_adapter: tuple[LoadedPipeline, IdentityStage], plain: LoadedPipeline
) -> None:
    loaded, stage = with_adapter
    # An avatar first, so the adapter's scale is not zero when the next job readies the model.
    stage.avatars(loaded, replace(PLAN, seeds=(5,), steps=2), FACE, None)
    tile = replace(PLAN, seeds=(3,), width=96, height=64, strength=0.3)
    # The adapter still runs (a loaded one needs an image on every call), but at scale zero
    # it adds exactly 0 × its attention to each cross-attention output: the same pixels.
    for call in (
        lambda pipe, extra: text_to_image(pipe, PLAN, **extra),
        lambda pipe, extra: image_to_image(pipe, PLAN, FACE, **extra),
        lambda pipe, extra: upscale(pipe, tile, FACE, 64, **extra),
    ):
        made = call(loaded, stage.without_face(loaded))
        expected = call(plain, {})
        assert all(
            np.array_equal(pixels(a), pixels(b)) for a, b in zip(made, expected, strict=True)
        )


def test_plus_face_weights_load_under_the_default_name(
    tiny_model: Path, tmp_path: Path, img2img_avatars: list[Image.Image]
) -> None:
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    weights = Settings().identity_adapter_weights
    folder = make_tiny_ip_adapter(tiny_model, tmp_path / "IP-Adapter", weight_name=weights)
    loaded = fresh(tiny_model)
    stage = choose_identity_stage(Settings(identity_adapter=folder), loaded)
    assert isinstance(stage, IPAdapterIdentity)
    (projection,) = loaded.text2image.unet.encoder_hid_proj.image_projection_layers
    assert isinstance(projection, IPAdapterPlusImageProjection)
    avatars = stage.avatars(loaded, PLAN, FACE, None)
    assert all(differ(a, b) for a, b in zip(avatars, img2img_avatars, strict=True))


def test_the_adapter_reaches_an_img2img_view_made_before_it(
    tiny_model: Path, adapter: Path
) -> None:
    loaded = fresh(tiny_model)
    image_to_image(loaded, replace(PLAN, seeds=(1,), steps=2), FACE)
    stage = IPAdapterIdentity(loaded, adapter, WEIGHTS, 0.6)
    assert len(stage.avatars(loaded, replace(PLAN, seeds=(1,), steps=2), FACE, None)) == 1


def test_an_adapter_that_loads_but_does_not_work_falls_back_and_is_unloaded(
    tiny_model: Path,
    adapter: Path,
    plain: LoadedPipeline,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """diffusers loads an adapter that does not fit its encoder without complaint; the stage's
    trial call finds it, and the worker goes on with img2img and without the encoder."""
    import workers.identity

    def mismatched(*_args: object, **_kwargs: object) -> list[Image.Image]:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x32 and 48x128)")

    loaded = fresh(tiny_model)
    monkeypatch.setattr(workers.identity, "text_to_image", mismatched)
    settings = Settings(identity_adapter=adapter, identity_adapter_weights=WEIGHTS)
    stage = choose_identity_stage(settings, loaded)
    assert isinstance(stage, ImageToImageIdentity)
    assert "cannot load the identity adapter" in caplog.text
    assert getattr(loaded.text2image, "image_encoder", None) is None
    monkeypatch.undo()
    plan = replace(PLAN, seeds=(1,), steps=2)
    assert not differ(text_to_image(loaded, plan)[0], text_to_image(plain, plan)[0])


def test_the_worker_loads_the_adapter_at_warm_up_not_in_the_first_job(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, adapter: Path
) -> None:
    """Loading it replaces the UNet's attention processors (and, under a compiled preset,
    would make every graph warm-up compiled compile again inside the first job)."""
    settings = worker_settings(
        emulator, tmp_path, tiny_model, identity_adapter=adapter, identity_adapter_weights=WEIGHTS
    )
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    try:
        runtime.warm_up()
        assert isinstance(runtime.__dict__.get("identity"), IPAdapterIdentity)
        processors = {
            type(p).__name__ for p in runtime.pipeline.text2image.unet.attn_processors.values()
        }
        assert any("IPAdapter" in name for name in processors), processors
    finally:
        runtime.close()
