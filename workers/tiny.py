"""A tiny, randomly initialised Stable Diffusion 1.x pipeline of the real architecture.

Tests and the demo use it so that nothing is downloaded: it has every part a real model has
(UNet, VAE that downsamples by 8, CLIP text encoder with tokenizer files, scheduler), loads
with `AutoPipelineForText2Image.from_pretrained`, and makes a 64×64 image in well under a
second on a CPU. Its images are coloured noise.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_IMAGE_SIZE = 64
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses for bytes (as in GPT-2 and CLIP)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer with a byte-level vocabulary and no merges: every character is a token,
    so any prompt (Hindi included) tokenizes, as with the real one, without downloading it."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [f"{ch}</w>" for ch in alphabet] + [_BOS, _EOS]
    (folder / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False), "utf-8"
    )
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    # Loaded from the files, the way a real model's tokenizer folder is read.
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(
        str(folder),
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_EOS,
        unk_token=_EOS,
        model_max_length=77,
    )
    return tokenizer


def build_tiny_pipeline(seed: int = 0, workdir: Path | None = None) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = _write_tokenizer((workdir or Path(".")) / "tokenizer-src")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # Four blocks: the VAE downsamples by 8 like the real one, so latents stay small.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=TINY_IMAGE_SIZE,
    )
    # Stable Diffusion 1.x's noise schedule.
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# Written into every folder make-tiny and make-random write: {"arch": ..., "seed": ...}.
MODEL_MARKER = "chitrakar-random.json"


class CannotWriteModel(Exception):
    """The model folder cannot be written there; the message says why, for the user."""


def made_arch(folder: Path) -> str | None:
    """The architecture ("tiny", "sd15", "sdxl") of a folder make-tiny or make-random wrote,
    or None for any other folder, or one whose marker cannot be read."""
    try:
        arch = json.loads((folder / MODEL_MARKER).read_text())["arch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return arch if isinstance(arch, str) else None


def write_model_folder(path: Path, arch: str, seed: int, save: Callable[[Path], None]) -> Path:
    """Have `save` write a model into a new folder, mark it as ours and move it to `path`,
    which may be missing, empty or a model we wrote before (replaced): never someone's files.
    Where `path` cannot be written, that is found before `save` runs (a full-size model takes
    a minute to build). Returns the resolved path; raises CannotWriteModel."""
    path = path.expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and made_arch(path) is None:
        raise CannotWriteModel(
            f"{path} exists and is not a model chitrakar wrote: give a new or empty folder"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target and renamed, so a reader never sees half a model.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-") as tmp:
            folder = Path(tmp) / "model"
            save(folder)
            (folder / MODEL_MARKER).write_text(json.dumps({"arch": arch, "seed": seed}) + "\n")
            # Readable by a worker running as another user (safetensors writes owner-only).
            for file in folder.rglob("*"):
                if file.is_file():
                    file.chmod(0o644)
            if path.exists():
                shutil.rmtree(path)
            os.replace(folder, path)
    except OSError as exc:
        raise CannotWriteModel(f"cannot write the model to {path}: {exc.strerror or exc}") from exc
    return path


def make_tiny(path: Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to `path` (a diffusers folder; see `write_model_folder`) and
    return it."""

    def save(folder: Path) -> None:
        pipe = build_tiny_pipeline(seed=seed, workdir=folder.with_name("src"))
        pipe.save_pretrained(str(folder))

    return write_model_folder(path, "tiny", seed, save)


def make_tiny_lora(
    model: Path,
    path: Path,
    seed: int = 0,
    rank: int = 4,
    unet_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    text_encoder: bool = False,
    alpha: int | None = None,
    rank_pattern: dict[str, int] | None = None,
    kohya: bool = False,
) -> Path:
    """Write a random LoRA (safetensors, diffusers' layout) for the UNet of a pipeline folder,
    such as the tiny one, and with `text_encoder` for its text encoder too: it lets a style's
    LoRA be loaded and switched with no download. Its weights are random and non-zero, so
    images made with it differ from those without.

    The shapes files come in: `rank_pattern` gives some layers other ranks; `alpha` an alpha
    other than the rank, written as diffusers' adapter metadata, or with `kohya` as the
    per-layer alphas of kohya's layout (`lora_unet_…lora_down.weight`, `….alpha`), the one
    most community LoRAs are shared in."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    def config(targets: list[str]) -> LoraConfig:
        # peft starts LoRA B at zero (no effect); random weights make the effect visible.
        return LoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            rank_pattern=rank_pattern or {},
            target_modules=targets,
            init_lora_weights=False,
        )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.add_adapter(config(list(unet_targets)))
    text_layers = None
    if text_encoder:
        from peft import inject_adapter_in_model

        encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
        # peft's own injection: transformers' add_adapter asks for a newer peft.
        inject_adapter_in_model(config(["q_proj", "k_proj", "v_proj", "out_proj"]), encoder)
        text_layers = {
            key.replace(".default.", "."): value
            for key, value in encoder.state_dict().items()
            if ".lora_" in key
        }
    unet_layers = get_peft_model_state_dict(unet)
    if kohya:
        from safetensors.torch import save_file

        if text_encoder:
            raise ValueError("make_tiny_lora writes kohya's layout for the UNet only")
        save_file(_kohya_layout(unet_layers, unet.peft_config["default"]), path)
        return path
    # diffusers' adapter metadata: the LoraConfig fields it rebuilds the adapter from.
    metadata = None
    if alpha is not None:
        metadata = {
            "r": rank,
            "lora_alpha": alpha,
            "rank_pattern": rank_pattern or {},
            "target_modules": list(unet_targets),
        }
    folder = Path(tempfile.mkdtemp(prefix=".lora-", dir=path.parent))
    try:
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=unet_layers,
            text_encoder_lora_layers=text_layers,
            weight_name=path.name,
            safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )
        os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def _kohya_layout(layers: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """peft's UNet LoRA keys as kohya's scripts name them, with each layer's alpha."""
    state = {}
    for key, value in layers.items():
        module, _, kind = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        if kind.startswith("A"):
            state[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
    return state


def _plus_image_proj_state_dict(
    embed_dims: int, output_dims: int, num_queries: int = 16
) -> dict[str, torch.Tensor]:
    """A random Resampler (IP-Adapter Plus and Plus-Face) under the original repository's key
    names: diffusers' own module, its keys mapped back the way diffusers' loader maps them."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    # diffusers reads the head count as to_q's width // 64: one head of 64 channels.
    resampler = IPAdapterPlusImageProjection(
        embed_dims=embed_dims,
        output_dims=output_dims,
        hidden_dims=64,
        depth=4,
        dim_head=64,
        heads=1,
        num_queries=num_queries,
    )
    state: dict[str, torch.Tensor] = {}
    parts = {
        "ln0": "0.norm1",
        "ln1": "0.norm2",
        "attn.to_q": "0.to_q",
        "attn.to_out.0": "0.to_out",
        "ff.0": "1.0",
        "ff.1.net.0.proj": "1.1",
        "ff.1.net.2": "1.3",
    }
    for key, value in resampler.state_dict().items():
        if not key.startswith("layers."):
            state[key] = value
            continue
        _, index, rest = key.split(".", 2)
        if rest.startswith(("attn.to_k.", "attn.to_v.")):
            continue  # stored together as to_kv, below
        for new, old in parts.items():
            if rest.startswith(new + "."):
                state[f"layers.{index}.{old}.{rest[len(new) + 1 :]}"] = value
                break
        else:
            raise AssertionError(f"unexpected Resampler key {key}")
    for index, block in enumerate(resampler.layers):
        state[f"layers.{index}.0.to_kv.weight"] = torch.cat(
            [block.attn.to_k.weight, block.attn.to_v.weight]
        )
    return state


def make_tiny_ip_adapter(
    model: Path, folder: Path, seed: int = 0, weight_name: str = "ip-adapter_sd15.safetensors"
) -> Path:
    """Write a random IP-Adapter for the UNet of a pipeline folder (such as the tiny one) in
    the layout of h94/IP-Adapter: `folder/models/<weight_name>` (safetensors with the
    "image_proj.*" and "ip_adapter.*" keys diffusers' `load_ip_adapter` reads) and a tiny CLIP
    image encoder in `folder/models/image_encoder`. A name containing "plus" (as in
    ip-adapter-plus-face_sd15.safetensors) gets the Plus format (a Resampler fed by the
    encoder's hidden states), any other name the plain one (a projection of its image
    embedding). Weights are random and non-zero, so the adapter changes the images made."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    cross_attention_dim: int = unet.config.cross_attention_dim
    channels: list[int] = list(unet.config.block_out_channels)
    # The encoder's image size is what the feature extractor that load_ip_adapter makes
    # resizes to; 224, as for the real encoder, also suits a pipeline that has one at 224.
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=32,
            projection_dim=32,
        )
    )
    if "plus" in weight_name:
        image_proj = _plus_image_proj_state_dict(
            embed_dims=encoder.config.hidden_size, output_dims=cross_attention_dim
        )
    else:
        tokens = 4  # diffusers' ImageProjection makes four tokens of the image embedding
        proj = torch.nn.Linear(encoder.config.projection_dim, tokens * cross_attention_dim)
        image_proj = {
            "proj.weight": proj.weight,
            "proj.bias": proj.bias,
            "norm.weight": 1 + 0.1 * torch.randn(cross_attention_dim),
            "norm.bias": 0.1 * torch.randn(cross_attention_dim),
        }
    # The original numbers every attention layer in the order diffusers lists the processors,
    # self- and cross-attention alternating; only cross-attention (odd numbers) has image keys
    # and values. diffusers' loader counts 1, 3, 5, … over the cross-attention layers.
    ip_adapter: dict[str, torch.Tensor] = {}
    cross = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    for number, name in zip(itertools.count(1, 2), cross, strict=False):
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = channels[::-1][int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        for kind in ("to_k_ip", "to_v_ip"):
            layer = torch.nn.Linear(cross_attention_dim, hidden, bias=False)
            ip_adapter[f"{number}.{kind}.weight"] = layer.weight
    state = {f"image_proj.{key}": value for key, value in image_proj.items()}
    state |= {f"ip_adapter.{key}": value for key, value in ip_adapter.items()}
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    save_file(
        {key: value.detach().contiguous() for key, value in state.items()}, models / weight_name
    )
    encoder.save_pretrained(str(models / "image_encoder"))
    return folder
