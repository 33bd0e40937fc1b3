"""A style LoRA that fails to load half-way, on an uncompiled worker: diffusers loads the
UNet's part, then raises on the text encoder's. The job goes on without the LoRA, and so
does every later job: no part of it stays on, the file is not tried again, and the LoRAs
loaded after it load and draw as they would in a fresh worker."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from chitrakar.domain import GenerationPlan
from workers import pipelines
from workers.pipelines import LoadedPipeline, load_pipeline, text_to_image, use_lora
from workers.tiny import make_tiny_lora

CPU = torch.device("cpu")
PLAN = GenerationPlan("a lighthouse", 64, 64, 3, (7,), 7.0)


@pytest.fixture(scope="module")
def loras(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    good = make_tiny_lora(tiny_model, folder / "good.safetensors", seed=1, text_encoder=True)
    # The same file with one text encoder tensor of the wrong shape (a LoRA made for another
    # text encoder): its UNet part loads, its text encoder part does not.
    state = load_file(str(good))
    key = next(k for k in state if k.startswith("text_encoder.") and "lora_A" in k)
    state[key] = torch.randn(state[key].shape[0], state[key].shape[1] + 3)
    bad = folder / "bad.safetensors"
    save_file(state, str(bad))
    return {"good": good, "bad": bad}


@pytest.fixture
def loaded(tiny_model: Path) -> LoadedPipeline:
    return load_pipeline(str(tiny_model), CPU, torch.float32)


@pytest.fixture
def loads(loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The files diffusers is asked to load, in order."""
    seen: list[str] = []
    original = loaded.text2image.load_lora_weights

    def load_lora_weights(path: str, **kwargs: Any) -> None:
        seen.append(path)
        original(path, **kwargs)

    monkeypatch.setattr(loaded.text2image, "load_lora_weights", load_lora_weights)
    yield seen


def _draw(loaded: LoadedPipeline) -> np.ndarray[Any, Any]:
    return np.asarray(text_to_image(loaded, PLAN)[0].convert("RGB"), dtype=np.int16)


def _pixels(loaded: LoadedPipeline, lora: Path | None) -> np.ndarray[Any, Any]:
    """A job's image: with this style's LoRA, or with none."""
    use_lora(loaded, str(lora) if lora else None, 1.0)
    return _draw(loaded)


def _adapters(loaded: LoadedPipeline) -> dict[str, list[str]]:
    pipe = loaded.text2image
    return {
        name: list(config)
        for name in ("unet", "text_encoder")
        if (config := getattr(getattr(pipe, name), "peft_config", None))
    }


def test_a_half_loaded_lora_leaves_nothing_behind(
    tiny_model: Path,
    loras: dict[str, Path],
    loaded: LoadedPipeline,
    loads: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fresh = load_pipeline(str(tiny_model), CPU, torch.float32)
    styled = _pixels(fresh, loras["good"])
    plain = _pixels(loaded, None)
    assert np.abs(styled - plain).max() > 0

    with caplog.at_level(logging.WARNING, logger=pipelines.__name__):
        assert use_lora(loaded, str(loras["bad"]), 1.0) is False
        assert caplog.text.count("cannot load LoRA") == 1
        assert "bad.safetensors" in caplog.text
        assert _adapters(loaded) == {} and loaded.loras == {}
        # The style's own job and the next job without a style: drawn without any of it.
        assert np.array_equal(_draw(loaded), plain)
        assert np.array_equal(_pixels(loaded, None), plain)
        # The style's next job: not loaded (nor logged) again.
        assert np.array_equal(_pixels(loaded, loras["bad"]), plain)
        assert caplog.text.count("cannot load LoRA") == 1
    assert loads == [str(loras["bad"])]

    # A LoRA loaded afterwards takes a name of its own and draws as in a fresh worker.
    assert np.array_equal(_pixels(loaded, loras["good"]), styled)
    assert loads == [str(loras["bad"]), str(loras["good"])]
    assert np.array_equal(_pixels(loaded, None), plain)


def test_a_half_loaded_lora_that_cannot_be_deleted_stays_off(
    loras: dict[str, Path], loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = _pixels(loaded, None)

    def refuse(*_: Any, **__: Any) -> None:
        raise RuntimeError("cannot delete")

    monkeypatch.setattr(loaded.text2image, "delete_adapters", refuse)
    assert use_lora(loaded, str(loras["bad"]), 1.0) is False
    assert _adapters(loaded)  # left behind, unrecorded
    assert np.array_equal(_pixels(loaded, None), plain)
    assert np.array_equal(_pixels(loaded, loras["bad"]), plain)
