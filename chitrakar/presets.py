"""Pipeline presets: how a worker loads and runs its model (precision, attention, compilation,
quantisation, memory savers, few-step schedulers), as named data.

The built-in presets are `presets.toml` beside this module; an operator's file of the same
shape (CHITRAKAR_PRESETS_FILE) replaces or adds presets and per-model choices. Which preset a
worker uses: CHITRAKAR_PRESET, else the model's entry under [models], else "auto" (the device's
default). What a preset needs from the hardware is decided here, so that a worker refuses a
preset it cannot run with one clear line instead of quietly running something else.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chitrakar.domain import GenerationPlan

BUILTIN_PRESETS = Path(__file__).with_suffix(".toml")
AUTO = "auto"
# What "auto" picks, by device type.
DEVICE_DEFAULTS = {"cpu": "cpu", "cuda": "gpu", "mps": "gpu"}
# float8 matrix multiplies need compute capability 8.9 (Ada Lovelace) or newer.
FP8_CAPABILITY = (8, 9)
# bfloat16 tensor cores arrived with Ampere.
BF16_CAPABILITY = (8, 0)

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Quantize = Literal["none", "int8-weight-only", "int8-dynamic", "fp8"]


class PresetError(ValueError):
    """A preset file or choice that cannot be used; one line for a start-up log."""


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = ""
    description: str
    dtype: Dtype = "auto"
    attention: Literal["sdpa", "eager"] = "sdpa"
    fuse_qkv: bool = False
    channels_last: bool = False
    compile: str = "off"
    quantize: Quantize = "none"
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload: Literal["none", "model", "sequential"] = "none"
    scheduler: Literal["lcm", "tcd", "euler-trailing"] | None = None
    speed_lora: str | None = None
    speed_lora_scale: float = Field(default=1.0, gt=0.0, le=2.0)
    steps: int | None = Field(default=None, ge=1, le=50)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)

    @field_validator("compile")
    @classmethod
    def _compile_mode(cls, value: str) -> str:
        modes = {"off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"}
        if value not in modes:
            raise ValueError(f"compile must be one of {sorted(modes)}")
        return value

    @property
    def compiled(self) -> bool:
        return self.compile != "off"


@dataclass(frozen=True)
class DeviceFacts:
    """What a preset's needs are checked against: the device type ("cpu", "cuda", "mps"),
    a CUDA device's compute capability, and whether a C++ compiler is there (torch.compile
    on a CPU builds C++)."""

    type: str
    capability: tuple[int, int] | None = None
    has_compiler: bool = True


def resolved_dtype(preset: Preset, device: DeviceFacts) -> str:
    """The dtype a preset runs in on this device: its own, or for "auto" half precision on a
    GPU and float32 on a CPU (which computes half precision slowly). bfloat16 where the GPU
    has it: SDXL's VAE overflows in float16, so diffusers decodes a float16 pipeline's latents
    in float32 (2.5 GiB more at 1024²), and on an H200 bfloat16 was faster too (BENCHMARKS.md)."""
    if preset.dtype != "auto":
        return preset.dtype
    if device.type == "cuda":
        bf16 = (device.capability or (0, 0)) >= BF16_CAPABILITY
        return "bfloat16" if bf16 else "float16"
    return "float16" if device.type == "mps" else "float32"


def unmet_needs(preset: Preset, device: DeviceFacts) -> list[str]:
    """Why this device cannot run the preset (empty when it can)."""
    reasons = []
    if preset.offload != "none" and device.type != "cuda":
        reasons.append(f"CPU offload ({preset.offload}) moves models to a CUDA GPU as they run")
    if preset.quantize == "fp8" and (
        device.type != "cuda" or (device.capability or (0, 0)) < FP8_CAPABILITY
    ):
        reasons.append("float8 needs an NVIDIA GPU of compute capability 8.9 or newer")
    old_gpu = device.type == "cuda" and (device.capability or (0, 0)) < BF16_CAPABILITY
    if preset.dtype == "bfloat16" and old_gpu:
        reasons.append("bfloat16 needs an NVIDIA GPU of compute capability 8.0 or newer")
    if preset.dtype == "float16" and device.type == "cpu":
        reasons.append("float16 on a CPU is slow and inexact; use bfloat16 or float32")
    if preset.compiled and device.type == "cpu" and not device.has_compiler:
        reasons.append("torch.compile on a CPU needs a C++ compiler (apt install g++)")
    if preset.compiled and device.type == "mps":
        reasons.append("torch.compile is not supported on Apple GPUs")
    return reasons


class PresetCatalogue(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    presets: dict[str, Preset]
    models: dict[str, str] = Field(default_factory=dict)

    def choose(self, requested: str | None, model: str | None, device_type: str) -> Preset:
        """The preset asked for by name, else the model's own, else the device's default."""
        name = requested or AUTO
        if name == AUTO:
            name = self.models.get(model or "", "") or DEVICE_DEFAULTS.get(device_type, "cpu")
        preset = self.presets.get(name)
        if preset is None:
            known = ", ".join(sorted(self.presets))
            raise PresetError(f"unknown preset {name!r}; the presets are: {known}")
        return preset

    def fixed_steps(self, requested: str | None, model: str | None) -> int | None:
        """The steps a worker runs for every job whatever its device, where its preset fixes
        them: the one named, else the model's own, else the device's default when every
        device's default fixes the same. None where jobs run the steps they ask for, or the
        name is unknown (the worker refuses to start)."""
        name = requested or AUTO
        if name == AUTO:
            name = self.models.get(model or "", "")
        if name:
            preset = self.presets.get(name)
            return preset.steps if preset is not None else None
        defaults = {
            self.presets[n].steps for n in set(DEVICE_DEFAULTS.values()) if n in self.presets
        }
        return defaults.pop() if len(defaults) == 1 else None


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise PresetError(f"cannot read the presets file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{path} is not valid TOML: {exc}") from None


# The top-level tables of a presets file.
_TABLES = ("presets", "models")


def load_presets(override: Path | None = None) -> PresetCatalogue:
    """The built-in presets with an operator's file laid over them: a preset named in both
    is replaced whole; [models] entries are merged."""
    source = f"{BUILTIN_PRESETS}" + (f" and {override}" if override else "")
    presets: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for path in (BUILTIN_PRESETS, override):
        if path is None:
            continue
        data = _read(path)
        # A misspelt table ([preset.gpu], [model]) would otherwise be ignored without a word.
        unknown = sorted(set(data) - set(_TABLES))
        if unknown:
            names = ", ".join(repr(key) for key in unknown)
            raise PresetError(
                f"{path}: unknown top-level key(s) {names}: the tables are [presets.NAME] "
                "and [models]"
            )
        for table, into in (("presets", presets), ("models", models)):
            section = data.get(table, {})
            if not isinstance(section, dict):
                raise PresetError(f"{path}: [{table}] must be a table")
            into.update(section)
    for name, fields in presets.items():
        if not isinstance(fields, dict):
            raise PresetError(f"{source}: presets.{name} must be a table ([presets.{name}])")
    try:
        catalogue = PresetCatalogue(
            presets={name: {**fields, "name": name} for name, fields in presets.items()},
            models=models,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PresetError(f"{source}: {where}: {first['msg']}") from None
    for model, name in catalogue.models.items():
        if name not in catalogue.presets:
            raise PresetError(f"{source}: model {model!r} names an unknown preset {name!r}")
    return catalogue


def adjust_plan(preset: Preset | None, plan: GenerationPlan) -> GenerationPlan:
    """A job's plan as this preset runs it: few-step presets fix the steps and guidance (a
    4-step model given 25 steps is slower and no better). img2img runs steps × strength of
    them, rounded down, so under any preset it keeps at least one (a variation of a 1-step
    portrait, at strength 0.55, would otherwise run none and make no image)."""
    steps, guidance = plan.steps, plan.guidance_scale
    if preset is not None:
        steps = preset.steps or steps
        guidance = guidance if preset.guidance_scale is None else preset.guidance_scale
    if plan.strength:
        steps = max(steps, math.ceil(1 / plan.strength))
    if (steps, guidance) == (plan.steps, plan.guidance_scale):
        return plan
    return replace(plan, steps=steps, guidance_scale=guidance)
