"""Style LoRAs under a compiled preset: one adapter whose weights are swapped in place.

torch.compile guards on the UNet's modules. Each style LoRA loaded as an adapter of its own,
each new scale (peft keeps it as a Python float) and each adapter switched on made it compile
the UNet again inside a user's job: 4–7 s for the tiny model on a CPU, minutes for SDXL with
autotuning on a GPU, once per style and scale, until dynamo's limit of cached graphs sent the
UNet back to eager mode for good (BENCHMARKS.md, "Style LoRAs under torch.compile").

So a compiled UNet gets one adapter, `SLOT`, before it is compiled, made to hold every style
LoRA the worker knows: every layer any of them adapts, at the largest rank, all zeros (peft
pads a smaller rank with zeros and zeroes the layers a LoRA leaves out, which changes nothing
in the result). A style comes in by copying its weights into the slot (peft's hotswap), with
its scale and each layer's alpha/rank folded into them, so that the slot's own scaling stays
1 and peft has nothing to compare between two LoRAs' configurations; no style switches the
slot off. The UNet then has two graphs, with
and without the slot, both compiled at warm-up, and no later job compiles.

The text encoders are not compiled: their part of a LoRA, if it has one, loads as a named
adapter of its own, as it does without compile.
"""

from __future__ import annotations

import logging
import math
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
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import _create_lora_config
from peft.utils.other import get_pattern_key

from chitrakar.presets import PresetError

log = logging.getLogger(__name__)

SLOT = "style"
_UNET = "unet"
# The only UNet keys a slot can take: a LoRA's down and up projections (no DoRA magnitudes,
# no LoRA biases), in peft's names.
_SWAPPABLE = re.compile(r"\.lora_[AB]\.weight$")
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"


class LoraMismatch(ValueError):
    """A LoRA file the slot cannot take; the message says why."""


@dataclass(frozen=True)
class StyleLora:
    """One LoRA file, read once and kept on the CPU (a few MB to a few hundred)."""

    path: str
    # The UNet's part, "<module>.lora_A.weight" and "<module>.lora_B.weight", with each
    # module's scaling (alpha / rank, as peft would set it for this file) folded into lora_B.
    unet: dict[str, torch.Tensor]
    # The text encoders' part, as diffusers reads it, with what it needs to load it.
    text_encoders: dict[str, torch.Tensor]
    alphas: dict[str, float] | None
    metadata: dict[str, Any] | None
    rank: int


def read_style_lora(pipe: Any, path: str) -> StyleLora:
    """Read a LoRA file (kohya's and other layouts converted by diffusers). Raises
    LoraMismatch for one whose UNet part is not plain LoRA weights."""
    state, alphas, metadata = pipe.lora_state_dict(
        path, unet_config=pipe.unet.config, return_lora_metadata=True
    )
    unet = _component(state, _UNET)
    rest = {key: value for key, value in state.items() if not key.startswith(_UNET + ".")}
    if not unet:
        raise LoraMismatch("it adapts no layer of the UNet")
    if "lora_A" not in next(iter(unet)):
        unet = convert_unet_state_dict_to_peft(unet)
    odd = [key for key in unet if not _SWAPPABLE.search(key)]
    if odd:
        raise LoraMismatch(f"its key {odd[0]} is not a plain LoRA weight")
    # The configuration diffusers would give this file as an adapter of its own, made the
    # way diffusers makes it, for each module's rank and alpha as peft would read them.
    ranks = {f"^{key}": value.shape[1] for key, value in unet.items() if key.endswith(_UP)}
    unet_alphas = _component(alphas or {}, _UNET) or None
    unet_metadata = _component(metadata or {}, _UNET) or None
    config = _create_lora_config(unet, unet_alphas, unet_metadata, ranks)
    folded: dict[str, torch.Tensor] = {}
    for key, down in unet.items():
        if not key.endswith(_DOWN):
            continue
        module = key.removesuffix(_DOWN)
        up = unet.get(module + _UP)
        if up is None:
            raise LoraMismatch(f"{module} has a down projection and no up projection")
        if up.shape[1] != down.shape[0]:
            raise LoraMismatch(f"{module}'s up and down projections have different ranks")
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern, module), config.r)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern, module), config.lora_alpha
        )
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        # In float32: peft scales in the model's dtype at run time, not the file's half.
        folded[key], folded[module + _UP] = down, up.float() * scaling
    return StyleLora(
        path,
        folded,
        rest,
        alphas,
        metadata,
        max(value.shape[0] for key, value in folded.items() if key.endswith(_DOWN)),
    )


def _component(mapping: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {
        key.removeprefix(prefix + "."): value
        for key, value in mapping.items()
        if key.startswith(prefix + ".")
    }


def _slot_shape(key: str, value: torch.Tensor, rank: int) -> torch.Size:
    # lora_A maps the layer's input down to the rank (rank first); lora_B maps it back up.
    shape = list(value.shape)
    shape[0 if key.endswith(_DOWN) else 1] = rank
    return torch.Size(shape)


@dataclass
class StyleSlot:
    """The compiled UNet's one style adapter, and which LoRA it holds now."""

    rank: int
    # The slot's keys and shapes: a LoRA fits when its keys are among them.
    shapes: dict[str, torch.Size]
    files: dict[str, StyleLora] = field(default_factory=dict)
    # (path, scale) of the LoRA in the slot; None when nothing (or a failed swap) is in it.
    holding: tuple[str, float] | None = None
    # Text encoder adapters by LoRA path (only LoRAs that adapt a text encoder have one).
    text_adapters: dict[str, str] = field(default_factory=dict)
    text_loads: int = 0
    # LoRAs whose text encoder part failed to load: not tried again (each try would leave
    # another half-loaded adapter behind).
    text_failed: set[str] = field(default_factory=set)
    # Set when a swap failed and diffusers took the adapter out: no style works until the
    # worker restarts (the compiled UNet cannot get its slot back).
    lost: bool = False

    def fits(self, lora: StyleLora) -> str | None:
        """Why the LoRA cannot go into this slot, or None when it can."""
        if lora.rank > self.rank:
            return f"its rank {lora.rank} is above the slot's {self.rank}"
        for key, value in lora.unet.items():
            if _slot_shape(key, value, self.rank) != self.shapes.get(key):
                return f"it adapts a layer the slot was not made for ({key})"
        return None


def make_style_slot(pipe: Any, paths: list[str]) -> StyleSlot | None:
    """Give the UNet its slot, sized for these LoRA files; before the UNet is compiled (and
    after it is quantised: the slot's own layers stay in the model's dtype). None when no
    file is there. A missing or unreadable file is left out, as a worker without compile
    runs its jobs without it; one the slot cannot switch (DoRA, LoRA biases, no UNet layer)
    is a PresetError: it works only in an uncompiled UNet."""
    files: dict[str, StyleLora] = {}
    for path in dict.fromkeys(paths):
        if not Path(path).is_file():
            log.warning("style LoRA %s does not exist: its jobs run without it", path)
            continue
        try:
            files[path] = read_style_lora(pipe, path)
        except LoraMismatch as why:
            raise PresetError(
                f"the style LoRA {path} cannot be switched in a compiled UNet: {why}. "
                "Use a preset without compile for it"
            ) from None
        except Exception as exc:  # diffusers raises many kinds for a file that does not fit
            log.warning("cannot read the style LoRA %s (%s): its jobs run without it", path, exc)
    if not files:
        return None
    rank = max(lora.rank for lora in files.values())
    shapes: dict[str, torch.Size] = {}
    for lora in files.values():
        for key, value in lora.unet.items():
            shape = _slot_shape(key, value, rank)
            if shapes.setdefault(key, shape) != shape:
                raise PresetError(
                    f"the style LoRAs disagree on the shape of {key}: {lora.path} has "
                    f"{tuple(value.shape)}"
                )
    zeros = {key: torch.zeros(shape, dtype=pipe.unet.dtype) for key, shape in shapes.items()}
    pipe.unet.enable_lora_hotswap(target_rank=rank)
    pipe.unet.load_lora_adapter(zeros, prefix=None, adapter_name=SLOT)
    pipe.unet.disable_lora()
    log.info(
        "style LoRA slot: %d layers at rank %d for %d LoRA file(s)",
        len(shapes) // 2,
        rank,
        len(files),
    )
    return StyleSlot(rank, shapes, files)


def use_style(pipe: Any, slot: StyleSlot, path: str, scale: float) -> bool:
    """Swap a LoRA into the slot at this scale and switch it on. Returns False, logging why,
    when it cannot be (the file is missing or unreadable, or it was not in the catalogue
    when the worker started and does not fit): the job then runs without it, as without
    compile a job with a missing file does."""
    if slot.lost:
        log.error("the style LoRA slot was lost: restart the worker; generating without %s", path)
        return False
    lora = slot.files.get(path)
    if lora is None:
        lora = _read_late(pipe, slot, path)
        if lora is None:
            return False
    if slot.holding != (path, scale) and not _swap_in(pipe, slot, lora, scale):
        return False
    if path in slot.text_failed:
        log.warning("LoRA %s's text encoder part did not load: generating without it", path)
        slot_off(pipe, slot)
        return False
    pipe.unet.enable_lora()
    try:
        _text_encoders_use(pipe, slot, lora, scale)
    except Exception as exc:  # a bad text encoder part must not fail jobs: no LoRA then
        slot.text_failed.add(path)
        log.warning(
            "cannot load LoRA %s's text encoder part (%s): generating without it", path, exc
        )
        slot_off(pipe, slot)
        return False
    return True


def _read_late(pipe: Any, slot: StyleSlot, path: str) -> StyleLora | None:
    """A LoRA that was not in the catalogue when the worker started, if the slot takes it."""
    if not Path(path).is_file():
        log.warning("LoRA file %s does not exist: generating without it", path)
        return None
    try:
        lora = read_style_lora(pipe, path)
    except Exception as exc:  # a bad file must not fail jobs: no LoRA then
        log.warning("cannot load LoRA %s (%s): generating without it", path, exc)
        return None
    why = slot.fits(lora)
    if why is not None:
        log.warning(
            "LoRA %s was not known when the compiled worker started and cannot be switched "
            "in (%s): generating without it; restart the worker to take it",
            path,
            why,
        )
        return None
    slot.files[path] = lora
    return lora


def _swap_in(pipe: Any, slot: StyleSlot, lora: StyleLora, scale: float) -> bool:
    """Copy the LoRA into the slot, padded to the slot's rank with zeros and scaled; layers
    it leaves out are zeroed by peft. Every swap thus has the slot's rank and scaling 1, the
    configuration peft checks a swap against."""
    slot.holding = None
    try:
        weights = {}
        for key, value in lora.unet.items():
            padded = torch.zeros(slot.shapes[key], dtype=value.dtype)
            if key.endswith(_DOWN):
                padded[: value.shape[0]] = value
            else:
                padded[:, : value.shape[1]] = value * scale
            weights[key] = padded
        pipe.unet.load_lora_adapter(weights, prefix=None, adapter_name=SLOT, hotswap=True)
    except Exception as exc:
        if SLOT not in (getattr(pipe.unet, "peft_config", None) or {}):
            slot.lost = True
        log.error(
            "cannot switch LoRA %s into the style slot (%s): generating without it", lora.path, exc
        )
        return False
    slot.holding = (lora.path, scale)
    return True


def slot_off(pipe: Any, slot: StyleSlot) -> None:
    if not slot.lost:
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
        # A new name each try: a failed load may have left its name in one encoder.
        slot.text_loads += 1
        name = f"{SLOT}{slot.text_loads}"
        for prefix, encoder in _text_encoders(pipe).items():
            if any(key.startswith(prefix + ".") for key in lora.text_encoders):
                pipe.load_lora_into_text_encoder(
                    lora.text_encoders,
                    network_alphas=lora.alphas,
                    text_encoder=encoder,
                    prefix=prefix,
                    adapter_name=name,
                    metadata=lora.metadata,
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
