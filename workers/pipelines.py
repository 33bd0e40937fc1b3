"""Loading a diffusers pipeline and calling it. Device and dtype are always explicit."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline
from PIL import Image, ImageOps

from chitrakar.config import Settings
from chitrakar.domain import SIZE_MULTIPLE, GenerationPlan
from chitrakar.presets import Preset, adjust_plan, load_presets
from workers.acceleration import (
    apply_preset,
    check_preset,
    preset_dtype,
    set_qkv_fused,
    use_compile_cache,
)
from workers.style_slot import StyleSlot, slot_off, use_style

log = logging.getLogger(__name__)

# Called after each denoising step with (steps done, steps in all).
ProgressCallback = Callable[[int, int], None]


class ModelNotFound(RuntimeError):
    pass


class DeviceUnavailable(RuntimeError):
    """CHITRAKAR_DEVICE names a device this machine does not have."""


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"CHITRAKAR_DEVICE={requested}, but torch sees no CUDA device")
        device = torch.device(requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"CHITRAKAR_DEVICE={requested}, but torch sees {torch.cuda.device_count()} GPU(s)"
            )
        if device.index is not None:
            # Otherwise this process would also open a CUDA context on GPU 0.
            torch.cuda.set_device(device)
        return device
    return torch.device(requested)


@dataclass
class LoadedPipeline:
    """One model in memory, with the views of it each kind of job uses. The img2img view
    shares the text-to-image pipeline's modules: no second copy of the weights."""

    source: str
    device: torch.device
    dtype: torch.dtype
    text2image: DiffusionPipeline
    # How it was loaded and is run (None: as diffusers loads it, on the device).
    preset: Preset | None = None
    # LoRA files loaded into the model so far, by path, with their adapter names.
    loras: dict[str, str] = field(default_factory=dict)
    # Adapter names given so far: each load gets a new one, as a failed load may leave its
    # name behind in a component it got to.
    lora_loads: int = 0
    # LoRA files that failed to load: not tried again (each try would load the file again,
    # and log again, for every job of the style).
    lora_failed: set[str] = field(default_factory=set)
    # Whether the UNet's attention now uses fused QKV projections, and whether it should
    # when no style LoRA is on (the preset's choice, until an IP-Adapter takes the layers).
    qkv_fused: bool = False
    fuse_wanted: bool = False
    # A compiled UNet's one style adapter (workers.style_slot); None: named adapters in `loras`.
    style_slot: StyleSlot | None = None
    _image2image: DiffusionPipeline | None = None

    def forget_views(self) -> None:
        """Drop the views after a component was added (an adapter's image encoder): `from_pipe`
        copies the component list, so a view made earlier would not see it."""
        self._image2image = None

    @property
    def image2image(self) -> DiffusionPipeline:
        if self._image2image is None:
            self._image2image = AutoPipelineForImage2Image.from_pipe(self.text2image)
            self._image2image.set_progress_bar_config(disable=True)
        return self._image2image


def load_pipeline(
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    preset: Preset | None = None,
    style_loras: Sequence[str] = (),
) -> LoadedPipeline:
    """Load a local diffusers folder, or a hub id from the local cache or the hub, and
    ready it as the preset says. With HF_HUB_OFFLINE=1 nothing is downloaded and a missing
    model is a clear error. `style_loras`: the LoRA files jobs may ask for, which a compiled
    preset must know before it compiles (others load when a job first asks)."""
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
    slot = None
    if preset is None:
        pipe.to(device)
    else:
        slot = apply_preset(pipe, preset, device, style_loras)
    pipe.set_progress_bar_config(disable=True)
    name = preset.name if preset else "none"
    log.info("loaded model %s on %s as %s with preset %s", source, device, dtype, name)
    fused = preset is not None and preset.fuse_qkv
    return LoadedPipeline(
        source,
        device,
        dtype,
        pipe,
        preset=preset,
        qkv_fused=fused,
        fuse_wanted=fused,
        style_slot=slot,
    )


def load_configured(
    settings: Settings, source: str, device: torch.device, style_loras: Sequence[str] = ()
) -> LoadedPipeline:
    """The model as this deployment runs it: under the preset its settings choose for this
    device (PresetError, with the reasons, when the device cannot run it). The worker and
    `chitrakar bench` load through here, so a benchmark measures what the worker runs."""
    catalogue = load_presets(settings.presets_file)
    preset = catalogue.choose(settings.preset, settings.model, device.type)
    check_preset(preset, device)
    if preset.compiled:
        use_compile_cache(settings.compile_cache_dir)
    return load_pipeline(source, device, preset_dtype(preset, device), preset, style_loras)


def use_lora(loaded: LoadedPipeline, path: str | None, scale: float) -> bool:
    """Switch the model to one style's LoRA, or to none. Each file is loaded once per worker
    and kept as a named adapter; switching only changes which adapter is active, so the base
    model is never loaded again. Under a compiled preset the file's weights are copied into
    the UNet's one style slot instead, so that no switch compiles again. A missing or
    unloadable file is logged and the job goes on without it. Returns whether the LoRA is active."""
    pipe = loaded.text2image
    if path is None:
        _switch_off(loaded)
        return False
    if loaded.style_slot is not None:
        if not use_style(pipe, loaded.style_slot, path, scale):
            _switch_off(loaded)
            return False
        _fuse_qkv(loaded, False)
        return True
    if loaded.preset is not None and loaded.preset.compiled:
        # No slot: the catalogue had no LoRA that could be read when the worker started.
        # As a named adapter, this one would compile the UNet again at every switch.
        log.warning(
            "LoRA %s was not known when the compiled worker started: generating without it; "
            "restart the worker to take it",
            path,
        )
        return False
    name = loaded.loras.get(path)
    if name is None:
        if path in loaded.lora_failed:
            log.debug("LoRA %s failed to load before: generating without it", path)
            _switch_off(loaded)
            return False
        if not Path(path).is_file():
            log.warning("LoRA file %s does not exist: generating without it", path)
            _switch_off(loaded)
            return False
        name = f"style{loaded.lora_loads}"
        loaded.lora_loads += 1
        try:
            pipe.load_lora_weights(path, adapter_name=name)
        except Exception as exc:  # a bad file must not fail jobs: no LoRA then
            # diffusers loads the UNet's part before the text encoders': a part that did
            # load would stay in the model, unrecorded, and change every later image.
            loaded.lora_failed.add(path)
            _delete_adapter(pipe, name)
            log.warning(
                "cannot load LoRA %s (%s): generating without it; not tried again until the "
                "worker restarts",
                path,
                exc,
            )
            _switch_off(loaded)
            return False
        loaded.loras[path] = name
        log.info("loaded LoRA %s as adapter %s", path, name)
    _fuse_qkv(loaded, False)
    pipe.enable_lora()
    pipe.set_adapters([name], adapter_weights=[scale])
    return True


def _switch_off(loaded: LoadedPipeline) -> None:
    if loaded.style_slot is not None:
        slot_off(loaded.text2image, loaded.style_slot)
    elif _adapters(loaded.text2image):
        # Any adapter, recorded or not: one a failed load left behind must not stay on.
        loaded.text2image.disable_lora()
    _fuse_qkv(loaded, loaded.fuse_wanted)


def _adapters(pipe: DiffusionPipeline) -> set[str]:
    """The LoRA adapters loaded in any of the pipeline's components."""
    names: set[str] = set()
    for component in pipe.components.values():
        names.update(getattr(component, "peft_config", None) or {})
    return names


def _delete_adapter(pipe: DiffusionPipeline, name: str) -> None:
    """Take out what a failed load left of an adapter, in whichever components it got to."""
    try:
        if name in _adapters(pipe):
            pipe.delete_adapters(name)
    except Exception as exc:  # then it stays, switched off with the others (`_switch_off`)
        log.error("cannot delete the half-loaded LoRA adapter %s (%s)", name, exc)


def give_up_fused_qkv(loaded: LoadedPipeline) -> None:
    """For good: an IP-Adapter sets attention processors of its own on every layer."""
    _fuse_qkv(loaded, False)
    loaded.fuse_wanted = False


def _fuse_qkv(loaded: LoadedPipeline, fused: bool) -> None:
    if loaded.qkv_fused != fused:
        set_qkv_fused(loaded.text2image, fused)
        loaded.qkv_fused = fused


def _generators(plans: Sequence[GenerationPlan]) -> list[torch.Generator]:
    # CPU generators give the same noise for a seed on any device, and one per image gives
    # each image the same noise whichever batch it is drawn in.
    return [torch.Generator("cpu").manual_seed(seed) for plan in plans for seed in plan.seeds]


def _step_callback(on_progress: ProgressCallback | None, offset: int = 0, total: int = 0) -> Any:
    """A diffusers step-end callback reporting (steps done, steps in all). img2img runs only
    part of the steps (strength), so the total comes from the pipeline unless given."""

    def step_end(pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if on_progress is not None:
            on_progress(offset + step + 1, total or int(pipe.num_timesteps))
        return kwargs

    return step_end


def text_to_image(
    loaded: LoadedPipeline,
    plan: GenerationPlan | Sequence[GenerationPlan],
    on_progress: ProgressCallback | None = None,
    **extra: Any,
) -> list[Image.Image]:
    """One pipeline call for all of a job's images, or for a batch of jobs that share size,
    steps, guidance and image count (see `domain.batch_key`): each prompt is drawn
    len(seeds) times, one seeded generator per image. The images come back in order,
    job by job."""
    batch = [plan] if isinstance(plan, GenerationPlan) else plan
    plans = [adjust_plan(loaded.preset, one) for one in batch]
    first = plans[0]
    with torch.inference_mode():
        output = loaded.text2image(
            prompt=[p.prompt for p in plans],
            # None unless one is given (SDXL then uses zeros, not the empty prompt's encoding);
            # jobs batched together either all have one or none (see `batch_key`).
            negative_prompt=[p.negative_prompt for p in plans] if first.negative_prompt else None,
            width=first.width,
            height=first.height,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            num_images_per_prompt=len(first.seeds),
            generator=_generators(plans),
            callback_on_step_end=_step_callback(on_progress, total=first.steps),
            **extra,
        )
    images: list[Image.Image] = output.images
    return images


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and centre-crop an image to exactly width × height."""
    return ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)


def start_pixels(image: Image.Image) -> torch.Tensor:
    """An img2img start image as the pipeline's processor makes it from a PIL image (RGB in
    [0, 1], 1 × 3 × H × W), but contiguous: the processor's is a transposed view, so the VAE
    encoded channels-last latents, and a compiled UNet and VAE decoder, compiled on text2image's
    contiguous ones, compiled again for every img2img job's ("stride mismatch")."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def image_to_image(
    loaded: LoadedPipeline,
    plan: GenerationPlan,
    start: Image.Image,
    on_progress: ProgressCallback | None = None,
    **extra: Any,
) -> list[Image.Image]:
    """Images that keep the start image's layout, `plan.strength` of the way to the prompt."""
    plan = adjust_plan(loaded.preset, plan)
    if plan.strength is None:
        raise ValueError("an img2img plan needs a strength")
    with torch.inference_mode():
        output = loaded.image2image(
            prompt=plan.prompt,
            negative_prompt=plan.negative_prompt or None,
            image=start_pixels(fit(start, plan.width, plan.height)),
            strength=plan.strength,
            num_inference_steps=plan.steps,
            guidance_scale=plan.guidance_scale,
            num_images_per_prompt=len(plan.seeds),
            generator=_generators([plan]),
            callback_on_step_end=_step_callback(on_progress),
            **extra,
        )
    images: list[Image.Image] = output.images
    return images


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `length`, overlapping by at least
    `overlap`; the last tile ends exactly at the edge."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - overlap) / stride)
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _feather(box: tuple[int, int, int, int], size: tuple[int, int], overlap: int) -> Image.Image:
    """A blending mask for a tile: opaque, fading over `overlap` pixels towards each edge
    that another tile overlaps (not at the image's own edges)."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top

    def ramp(length: int, fade_start: bool, fade_end: bool) -> np.ndarray[Any, Any]:
        up = np.minimum(np.arange(length) + 1, overlap) / overlap
        values = np.ones(length)
        if fade_start:
            values = np.minimum(values, up)
        if fade_end:
            values = np.minimum(values, up[::-1])
        return values

    mask = np.outer(ramp(height, top > 0, bottom < size[1]), ramp(width, left > 0, right < size[0]))
    return Image.fromarray((mask * 255).astype(np.uint8), mode="L")


def upscale(
    loaded: LoadedPipeline,
    plan: GenerationPlan,
    start: Image.Image,
    tile: int,
    on_progress: ProgressCallback | None = None,
    **extra: Any,
) -> list[Image.Image]:
    """The start image at plan.width × plan.height: resized, then redrawn tile by tile with
    img2img at low strength to add detail. Tiles of the model's native size keep memory
    flat whatever the output size; overlapping, feathered edges hide the seams."""
    plan = adjust_plan(loaded.preset, plan)
    if plan.strength is None:
        raise ValueError("an upscale plan needs a strength")
    big = start.convert("RGB").resize((plan.width, plan.height), Image.Resampling.LANCZOS)
    tile_w, tile_h = min(tile, plan.width), min(tile, plan.height)
    overlap = max(SIZE_MULTIPLE, (tile // 8) // SIZE_MULTIPLE * SIZE_MULTIPLE)
    boxes = [
        (x, y, x + tile_w, y + tile_h)
        for y in tile_origins(plan.height, tile_h, overlap)
        for x in tile_origins(plan.width, tile_w, overlap)
    ]
    steps_per_tile = max(1, int(plan.steps * plan.strength))
    total = steps_per_tile * len(boxes)
    result = big.copy()
    tile_plan = replace(plan, width=tile_w, height=tile_h)
    for number, box in enumerate(boxes):
        progress = _offset(on_progress, number * steps_per_tile, total)
        (redrawn,) = image_to_image(loaded, tile_plan, big.crop(box), progress, **extra)
        result.paste(redrawn, box[:2], _feather(box, big.size, overlap))
    return [result]


def _offset(on_progress: ProgressCallback | None, done: int, total: int) -> ProgressCallback:
    def report(step: int, _steps: int) -> None:
        if on_progress is not None:
            on_progress(min(done + step, total), total)

    return report
