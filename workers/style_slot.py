"""Style LoRAs under a compiled preset: one adapter whose weights are swapped in place.

torch.compile guards on the UNet's modules. Each style LoRA loaded as an adapter of its own,
each new scale (peft keeps it as a Python float) and each adapter switched on made it compile
the UNet again inside a user's job: 4–7 s for the tiny model on a CPU, minutes for SDXL with
autotuning on a GPU, once per style and scale, until dynamo's limit of cached graphs sent the
UNet back to eager mode for good (BENCHMARKS.md, "Style LoRAs under torch.compile").

So a compiled UNet gets one adapter, `SLOT`, before it is compiled, made to hold every style
LoRA the worker knows: every layer any of them adapts, at the largest rank, all zeros (peft
pads a smaller rank with zeros and zeroes the layers a LoRA leaves out, which changes nothing
in the result). A style comes in by copying its weights into the slot (peft's hotswap), its
scale folded into them; no style switches the slot off. The UNet then has two graphs, with
and without the slot, both compiled at warm-up, and no later job compiles.

The text encoders are not compiled: their part of a LoRA, if it has one, loads as a named
adapter of its own, as it does without compile.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)

from chitrakar.presets import PresetError

log = logging.getLogger(__name__)

SLOT = "style"
_UNET = "unet."
# The only UNet keys a slot can take: a LoRA's down and up projections (no DoRA magnitudes,
# no LoRA biases), named as diffusers names them.
_SWAPPABLE = re.compile(r"\.lora_[AB]\.weight$")


@dataclass(frozen=True)
class StyleLora:
    """One LoRA file, read once and kept on the CPU (a few MB to a few hundred)."""

    path: str
    unet: dict[str, torch.Tensor]  # "unet."-prefixed keys
    text_encoders: dict[str, Any]  # the rest: the text encoders' parts
    alphas: dict[str, float] | None  # kohya files' network alphas, as diffusers maps them
    rank: int

    @property
    def unet_alphas(self) -> dict[str, float] | None:
        if not self.alphas:
            return None
        return {key: alpha for key, alpha in self.alphas.items() if key.startswith(_UNET)}


def read_style_lora(pipe: Any, path: str) -> StyleLora:
    """A LoRA file in diffusers' layout (converted from kohya's and others' by diffusers)."""
    state, alphas = pipe.lora_state_dict(path, unet_config=pipe.unet.config)
    unet = {key: value for key, value in state.items() if key.startswith(_UNET)}
    rest = {key: value for key, value in state.items() if not key.startswith(_UNET)}
    ranks = [value.shape[0] for key, value in unet.items() if ".lora_A." in key]
    return StyleLora(path, unet, rest, alphas, max(ranks, default=0))


@dataclass
class StyleSlot:
    """The compiled UNet's one style adapter, and which LoRA it holds now."""

    rank: int
    # The slot's keys and shapes: a LoRA fits when its keys are among them.
    shapes: dict[str, torch.Size]
    files: dict[str, StyleLora] = field(default_factory=dict)
    # (path, scale) of the LoRA in the slot; None when nothing was swapped in yet.
    holding: tuple[str, float] | None = None
    # Text encoder adapters by LoRA path (only LoRAs that adapt a text encoder have one).
    text_adapters: dict[str, str] = field(default_factory=dict)

    def fits(self, lora: StyleLora) -> str | None:
        """Why the LoRA cannot go into this slot, or None when it can."""
        if not lora.unet:
            return "it adapts no layer of the UNet"
        if lora.rank > self.rank:
            return f"its rank {lora.rank} is above the slot's {self.rank}"
        unknown = [
            key
            for key in lora.unet
            if _slot_shape(key, lora.unet[key], self.rank) != self.shapes.get(key)
        ]
        if unknown:
            return f"it adapts layers the slot was not made for ({unknown[0]})"
        return None


def make_style_slot(pipe: Any, paths: list[str]) -> StyleSlot | None:
    """Give the UNet its slot, sized for these LoRA files; before the UNet is compiled (and
    after it is quantised: the slot's own layers stay in the model's dtype). None when no
    file is given. A file the slot cannot take is a PresetError: a compiled worker would
    otherwise compile again for it in a user's job."""
    files = {}
    for path in dict.fromkeys(paths):
        try:
            files[path] = read_style_lora(pipe, path)
        except Exception as exc:  # diffusers raises many kinds for a file that does not fit
            raise PresetError(f"cannot read the style LoRA {path}: {exc}") from exc
    if not files:
        return None
    for lora in files.values():
        odd = [key for key in lora.unet if not _SWAPPABLE.search(key)]
        if odd or not lora.unet:
            why = (
                f"its key {odd[0]} is not a plain LoRA weight" if odd else "it adapts no UNet layer"
            )
            raise PresetError(
                f"the style LoRA {lora.path} cannot be switched in a compiled UNet: {why}. "
                "Use a preset without compile for it"
            )
    rank = max(lora.rank for lora in files.values())
    shapes: dict[str, torch.Size] = {}
    for lora in files.values():
        for key, value in lora.unet.items():
            shapes.setdefault(key, _slot_shape(key, value, rank))
    dtype = pipe.unet.dtype
    zeros = {key: torch.zeros(shape, dtype=dtype) for key, shape in shapes.items()}
    unet = pipe.unet
    unet.enable_lora_hotswap(target_rank=rank)
    unet.load_lora_adapter(zeros, prefix="unet", adapter_name=SLOT)
    unet.disable_lora()
    log.info(
        "style LoRA slot: %d layers at rank %d for %d LoRA file(s)",
        len(shapes) // 2,
        rank,
        len(files),
    )
    return StyleSlot(rank, {key: value.shape for key, value in zeros.items()}, files)


def _slot_shape(key: str, value: torch.Tensor, rank: int) -> torch.Size:
    # lora_A maps the layer's input down to the rank (rank first); lora_B maps it back up.
    shape = list(value.shape)
    shape[0 if ".lora_A." in key else 1] = rank
    return torch.Size(shape)


def use_style(pipe: Any, slot: StyleSlot, path: str, scale: float) -> bool:
    """Swap a LoRA into the slot at this scale and switch it on. Returns False, logging why,
    when the file cannot be read or does not fit (it was not in the catalogue when the
    worker started): the job then runs without it, as with a missing file."""
    lora = slot.files.get(path)
    if lora is None:
        if not Path(path).is_file():
            log.warning("LoRA file %s does not exist: generating without it", path)
            return False
        try:
            lora = read_style_lora(pipe, path)
        except Exception as exc:  # a bad file must not fail jobs: no LoRA then
            log.warning("cannot load LoRA %s (%s): generating without it", path, exc)
            return False
        why = slot.fits(lora)
        if why is not None:
            log.warning(
                "LoRA %s was not known when the compiled worker started and cannot be switched "
                "in (%s): generating without it; restart the worker to take it",
                path,
                why,
            )
            return False
        slot.files[path] = lora
    if slot.holding != (path, scale):
        # The scale is folded into the up projection: peft's own scale is a tensor the
        # compiled graph reads, and setting it would put a Python float back.
        weights = {
            key: value * scale if ".lora_B." in key else value for key, value in lora.unet.items()
        }
        pipe.unet.load_lora_adapter(
            weights, prefix="unet", network_alphas=lora.unet_alphas, adapter_name=SLOT, hotswap=True
        )
        slot.holding = (path, scale)
    pipe.unet.enable_lora()
    _text_encoders_use(pipe, slot, lora, scale)
    return True


def slot_off(pipe: Any, slot: StyleSlot) -> None:
    pipe.unet.disable_lora()
    for encoder in _text_encoders(pipe).values():
        if getattr(encoder, "peft_config", None):
            disable_lora_for_text_encoder(encoder)


def _text_encoders(pipe: Any) -> dict[str, Any]:
    """The pipeline's text encoders by the prefix of their keys in a LoRA file."""
    return {
        name: encoder
        for name in ("text_encoder", "text_encoder_2")
        if (encoder := getattr(pipe, name, None)) is not None
    }


def _text_encoders_use(pipe: Any, slot: StyleSlot, lora: StyleLora, scale: float) -> None:
    """The LoRA's text encoder part as a named adapter, loaded the first time; every other
    text encoder adapter off."""
    name = slot.text_adapters.get(lora.path)
    if name is None and lora.text_encoders:
        name = f"{SLOT}{len(slot.text_adapters)}"
        for prefix, encoder in _text_encoders(pipe).items():
            if any(key.startswith(prefix + ".") for key in lora.text_encoders):
                pipe.load_lora_into_text_encoder(
                    lora.text_encoders,
                    network_alphas=lora.alphas,
                    text_encoder=encoder,
                    prefix=prefix,
                    adapter_name=name,
                    _pipeline=pipe,
                )
        slot.text_adapters[lora.path] = name
    for encoder in _text_encoders(pipe).values():
        adapters = getattr(encoder, "peft_config", None) or {}
        if name is not None and name in adapters:
            enable_lora_for_text_encoder(encoder)
            set_adapters_for_text_encoder([name], encoder, [scale])
        elif adapters:
            disable_lora_for_text_encoder(encoder)
