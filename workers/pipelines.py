"""Loading a diffusers pipeline and calling it. Device and dtype are always explicit."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline
from PIL import Image

from chitrakar.domain import GenerationPlan

log = logging.getLogger(__name__)

# Called after each denoising step with (steps done, steps in all).
ProgressCallback = Callable[[int, int], None]


class ModelNotFound(RuntimeError):
    pass


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CHITRAKAR_DEVICE=cuda, but torch sees no CUDA device")
    return torch.device(requested)


def default_dtype(device: torch.device) -> torch.dtype:
    # Half precision halves memory and time on accelerators; CPUs compute it slowly or badly.
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


@dataclass
class LoadedPipeline:
    source: str
    device: torch.device
    dtype: torch.dtype
    text2image: DiffusionPipeline


def load_pipeline(source: str, device: torch.device, dtype: torch.dtype) -> LoadedPipeline:
    """Load a local diffusers folder, or a hub id from the local cache or the hub.
    With HF_HUB_OFFLINE=1 nothing is downloaded and a missing model is a clear error."""
    is_local = Path(source).expanduser().is_dir()
    if not is_local and ("/" not in source or source.startswith((".", "/", "~"))):
        raise ModelNotFound(f"model folder {source!r} does not exist")
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(
            str(Path(source).expanduser()) if is_local else source,
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only the local cache is searched)" if offline else ""
        raise ModelNotFound(f"cannot load model {source!r}{hint}: {exc}") from exc
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded model %s on %s as %s", source, device, dtype)
    return LoadedPipeline(source=source, device=device, dtype=dtype, text2image=pipe)


def generate_images(
    loaded: LoadedPipeline, plan: GenerationPlan, on_progress: ProgressCallback | None = None
) -> list[Image.Image]:
    """One pipeline call for all of a job's images, one seeded generator per image."""
    # CPU generators give the same noise for a seed on any device.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in plan.seeds]

    def step_end(_pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if on_progress is not None:
            on_progress(step + 1, plan.steps)
        return kwargs

    with torch.inference_mode():
        output = loaded.text2image(
            prompt=plan.prompt,
            width=plan.width,
            height=plan.height,
            num_inference_steps=plan.steps,
            guidance_scale=plan.guidance_scale,
            num_images_per_prompt=len(plan.seeds),
            generator=generators,
            callback_on_step_end=step_end,
        )
    images: list[Image.Image] = output.images
    return images
