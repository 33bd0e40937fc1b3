"""Applying a pipeline preset to a loaded diffusers pipeline: precision, attention kernels,
fused projections, memory layout, quantisation, placement or offload, VAE memory savers,
few-step schedulers and LoRAs, and torch.compile with an on-disk cache.

The order matters and is fixed here: a speed LoRA is fused before anything changes the
weights' layout; quantisation runs on the device the weights will live on; compilation comes
last, after every module is in its final form (a compiled UNet's style LoRA slot included).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler, TCDScheduler
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)

from chitrakar.presets import DeviceFacts, Preset, PresetError, resolved_dtype, unmet_needs
from workers.style_slot import StyleSlot, make_style_slot

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPEED_ADAPTER = "speed"


def device_facts(device: torch.device) -> DeviceFacts:
    capability = None
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
    return DeviceFacts(device.type, capability, has_compiler=shutil.which("c++") is not None)


def check_preset(preset: Preset, device: torch.device) -> None:
    """Raises PresetError, with every reason, when this device cannot run the preset."""
    reasons = unmet_needs(preset, device_facts(device))
    if reasons:
        raise PresetError(f"preset {preset.name!r} cannot run on {device}: " + "; ".join(reasons))


def preset_dtype(preset: Preset, device: torch.device) -> torch.dtype:
    return DTYPES[resolved_dtype(preset, device_facts(device))]


def use_compile_cache(folder: Path) -> None:
    """Point Inductor's caches (compiled graphs, autotuning results) at a folder that outlives
    the process, so a restarted worker compiles from cache in seconds instead of minutes.
    Must run before the first compilation."""
    folder.mkdir(parents=True, exist_ok=True)
    # Set, not defaulted: Inductor writes its default folder into the environment the
    # first time it looks (importing torchao does), which must not win over the data dir.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def apply_preset(
    pipe: Any, preset: Preset, device: torch.device, style_loras: Sequence[str] = ()
) -> StyleSlot | None:
    """Everything a preset does to a freshly loaded pipeline (on the CPU, in its dtype),
    ending with the pipeline placed on (or offloaded to) `device`. A compiled UNet gets one
    slot for these style LoRA files first (workers.style_slot), returned."""
    if preset.scheduler is not None:
        _set_scheduler(pipe, preset.scheduler)
    if preset.speed_lora is not None:
        _fuse_speed_lora(pipe, preset.speed_lora, preset.speed_lora_scale)
    processor = AttnProcessor2_0() if preset.attention == "sdpa" else AttnProcessor()
    pipe.unet.set_attn_processor(processor)
    pipe.vae.set_attn_processor(processor)
    if preset.fuse_qkv:
        if not hasattr(pipe, "fuse_qkv_projections"):
            raise PresetError(f"{type(pipe).__name__} cannot fuse its QKV projections")
        pipe.fuse_qkv_projections()
    if preset.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        # The decoder only: a channels-last encoder gives img2img channels-last latents, and
        # a compiled UNet, compiled on text2image's contiguous ones, would compile again.
        pipe.vae.decoder.to(memory_format=torch.channels_last)
    if preset.offload == "none":
        pipe.to(device)
        _quantize(pipe, preset)
    else:
        # Offloaded modules live on the CPU between calls: quantise them there.
        _quantize(pipe, preset)
        if preset.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
    if preset.vae_slicing:
        pipe.vae.enable_slicing()
    if preset.vae_tiling:
        pipe.vae.enable_tiling()
    if not preset.compiled:
        return None
    slot = make_style_slot(pipe, list(style_loras))
    # The UNet runs every step; the VAE decoder once per image but on the largest tensors.
    # No fullgraph: a style LoRA's layers may break the graph, which must not fail a job.
    mode = compile_mode(preset, device)
    pipe.unet.compile(mode=mode)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode)
    return slot


def compile_mode(preset: Preset, device: torch.device) -> str:
    """The preset's torch.compile mode; on a CPU always "default": autotuning and CUDA
    graphs are GPU techniques, and on a CPU they only lengthen the warm-up (about 2× here)."""
    if device.type == "cpu" and preset.compile != "default":
        log.info("compiling with mode 'default' on the CPU (the preset says %s)", preset.compile)
        return "default"
    return preset.compile


def _set_scheduler(pipe: Any, name: str) -> None:
    config = pipe.scheduler.config
    if name == "lcm":
        pipe.scheduler = LCMScheduler.from_config(config)
    elif name == "tcd":
        pipe.scheduler = TCDScheduler.from_config(config)
    else:
        # SDXL-Lightning, Hyper-SD and Turbo models sample from the last timestep.
        pipe.scheduler = EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")


def speed_lora_source(source: str) -> tuple[str, str | None]:
    """Where a speed LoRA is: (a local file, None) or (a Hub repo, the file in it). As
    `load_pipeline` tells a model folder from a Hub id, a source that reads as a path (it
    starts with /, . or ~, or its folder exists here) is a local file, and a missing one is
    refused here by name rather than looked up on the Hub; only "org/repo/file.safetensors"
    is a Hub file. Raises PresetError otherwise."""
    path = Path(source).expanduser()
    if path.is_file():
        return str(path), None
    if path.exists():
        raise PresetError(f"speed_lora file {source!r} is not a file")
    if source.startswith(("/", ".", "~")) or (path.parent != Path() and path.parent.is_dir()):
        raise PresetError(f"speed_lora file {source!r} does not exist")
    parts = source.split("/")
    if len(parts) != 3 or not all(parts) or not parts[2].endswith(".safetensors"):
        raise PresetError(
            f"speed_lora file {source!r} does not exist, and it is not a Hub file "
            "'org/repo/file.safetensors'"
        )
    return f"{parts[0]}/{parts[1]}", parts[2]


def _fuse_speed_lora(pipe: Any, source: str, scale: float) -> None:
    """Bake a few-step LoRA into the weights: it is always on, costs nothing per step, and
    style LoRAs still load and switch per job on top of it."""
    where, weight_name = speed_lora_source(source)
    try:
        if weight_name is None:
            pipe.load_lora_weights(where, adapter_name=SPEED_ADAPTER)
        else:
            pipe.load_lora_weights(where, weight_name=weight_name, adapter_name=SPEED_ADAPTER)
    except Exception as exc:  # peft and diffusers raise many kinds for a file that does not fit
        raise PresetError(f"cannot load the speed LoRA {source!r}: {exc}") from exc
    pipe.fuse_lora(adapter_names=[SPEED_ADAPTER], lora_scale=scale)
    pipe.unload_lora_weights()
    log.info("fused the few-step LoRA %s at scale %s", source, scale)


def _quantize(pipe: Any, preset: Preset) -> None:
    if preset.quantize == "none":
        return
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        raise PresetError(
            f"preset {preset.name!r} quantises with torchao: pip install 'chitrakar[quant]'"
        ) from None
    configs = {
        "int8-weight-only": Int8WeightOnlyConfig,
        "int8-dynamic": Int8DynamicActivationInt8WeightConfig,
        "fp8": Float8DynamicActivationFloat8WeightConfig,
    }
    # The UNet holds nearly all the weights and all the steps; the text encoders run once.
    quantize_(pipe.unet, configs[preset.quantize]())
    log.info("quantised the UNet: %s", preset.quantize)


def set_qkv_fused(pipe: Any, fused: bool) -> None:
    """A style LoRA adapts the separate query, key and value projections, which fused
    attention does not read: jobs with a LoRA run unfused, the others fused again. Only the
    UNet's processors change: the fused weights were made once at load (making them again
    would concatenate quantised tensors, which torchao cannot), and the VAE takes no LoRA."""
    if fused:
        pipe.unet.set_attn_processor(FusedAttnProcessor2_0())
    else:
        # A copy: set_attn_processor empties the dict it is given, and diffusers' own
        # unfuse_qkv_projections hands it the saved one, so it works only once.
        pipe.unet.set_attn_processor(dict(pipe.unet.original_attn_processors))


def warm_up(run_once: Any, preset: Preset) -> float | None:
    """Compile before the first user waits for it: run one short generation. Returns the
    seconds it took, or None when the preset compiles nothing."""
    if not preset.compiled:
        return None
    started = perf_counter()
    run_once()
    seconds = perf_counter() - started
    log.info(
        "preset %s warmed up (compiled or read from the cache) in %.1f s", preset.name, seconds
    )
    return seconds
