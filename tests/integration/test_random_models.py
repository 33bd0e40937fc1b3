"""The full-size random SD 1.5 pipeline is written, loads offline and denoises (one step at
64×64, on the CPU): it stands in for the real weights when benchmarking on a GPU."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import AutoPipelineForText2Image

from workers.random_models import make_random


@pytest.fixture
def sd15_folder(tmp_path: Path) -> Iterator[Path]:
    # Removed at once: pytest keeps the last runs' tmp folders, and this one is 2 GB.
    try:
        yield make_random("sd15", tmp_path / "sd15", torch.float16)
    finally:
        shutil.rmtree(tmp_path / "sd15", ignore_errors=True)


def test_full_size_sd15_loads_offline_and_denoises(
    sd15_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet_bytes = sum(f.stat().st_size for f in (sd15_folder / "unet").glob("*.safetensors"))
    assert unet_bytes > 2 * 859_520_964  # fp16, full size

    pipe = AutoPipelineForText2Image.from_pretrained(
        sd15_folder, dtype=torch.float32, local_files_only=True
    )
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    # runwayml/stable-diffusion-v1-5's UNet (diffusers' num_parameters docstring).
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
    assert pipe.unet.dtype == torch.float32
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == 49408

    latents = pipe(
        "a cinematic portrait",
        num_inference_steps=1,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latents.shape == (1, 4, 8, 8)
    assert torch.isfinite(latents).all()
