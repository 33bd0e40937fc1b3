"""Style LoRAs under torch.compile: a compiled worker switches styles, scales and no style
without compiling its UNet again, and its images are the ones the named adapters make.

The slot's own logic runs on an uncompiled pipeline (fast); one test compiles the tiny model
on this CPU (Inductor, with a C++ compiler) through the worker's own start-up and warm-up."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch._dynamo
from PIL import Image
from safetensors.torch import load_file, save_file

from chitrakar.domain import GenerationPlan
from chitrakar.planning import usual_sizes
from chitrakar.presets import Preset, PresetError
from chitrakar.styles import load_catalogue
from tests.support.botapi import BotApiEmulator
from tests.support.stack import worker_settings
from workers.acceleration import use_compile_cache
from workers.pipelines import LoadedPipeline, load_pipeline, text_to_image, use_lora
from workers.runtime import WorkerRuntime
from workers.style_slot import make_style_slot
from workers.tiny import make_tiny_lora

CPU = torch.device("cpu")
PLAN = GenerationPlan("a lighthouse at dusk", 64, 64, 2, (7,), 7.0)
_A_LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def loras(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        # Adapts the text encoder too: that part stays a named adapter.
        "ink": make_tiny_lora(tiny_model, folder / "ink.safetensors", seed=1, text_encoder=True),
        # Another rank, and fewer layers: the slot pads and zeroes.
        "clay": make_tiny_lora(
            tiny_model, folder / "clay.safetensors", seed=2, rank=8, unet_targets=("to_q", "to_v")
        ),
        # Alpha other than the rank, as diffusers' metadata says; layers of mixed ranks;
        # kohya's layout with its per-layer alphas (most shared LoRAs): each layer's scaling
        # is folded into the slot's weights.
        "meta": make_tiny_lora(tiny_model, folder / "meta.safetensors", seed=6, alpha=2),
        "mixed": make_tiny_lora(
            tiny_model, folder / "mixed.safetensors", seed=7, rank_pattern={"to_q": 2}
        ),
        "kohya": make_tiny_lora(
            tiny_model, folder / "kohya.safetensors", seed=8, alpha=2, kohya=True
        ),
        # Not in the catalogue when the worker starts, but fits the slot.
        "late": make_tiny_lora(tiny_model, folder / "late.safetensors", seed=3),
        # Not in the catalogue, and a rank above the slot's.
        "wide": make_tiny_lora(tiny_model, folder / "wide.safetensors", seed=4, rank=16),
        # Not in the catalogue, and a layer the slot does not have.
        "ff": make_tiny_lora(
            tiny_model, folder / "ff.safetensors", seed=5, unet_targets=("to_q", "ff.net.2")
        ),
    }


def _pixels(loaded: LoadedPipeline, lora: Path | None, scale: float = 1.0) -> np.ndarray[Any, Any]:
    use_lora(loaded, str(lora) if lora else None, scale)
    return np.asarray(text_to_image(loaded, PLAN)[0].convert("RGB"), dtype=np.int16)


def _named_adapters(model: Path, loras: dict[str, Path]) -> dict[tuple[str, float], Any]:
    """What each switch gives with named adapters (no slot): the reference."""
    loaded = load_pipeline(str(model), CPU, torch.float32, Preset(name="f", description=""))
    switches = [("none", 1.0), ("ink", 1.0), ("clay", 1.0), ("ink", 0.5), ("late", 1.0)]
    switches += [("meta", 1.0), ("mixed", 1.0), ("kohya", 0.5)]
    return {
        (key, scale): _pixels(loaded, None if key == "none" else loras[key], scale)
        for key, scale in switches
    }


def test_the_slot_gives_each_style_the_named_adapters_images(
    tiny_model: Path, loras: dict[str, Path], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    reference = _named_adapters(tiny_model, loras)
    loaded = load_pipeline(str(tiny_model), CPU, torch.float32, Preset(name="s", description=""))
    catalogue = [str(loras[key]) for key in ("ink", "clay", "meta", "mixed", "kohya")]
    loaded.style_slot = make_style_slot(loaded.text2image, catalogue)
    assert loaded.style_slot is not None and loaded.style_slot.rank == 8

    order = [("ink", 1.0), ("none", 1.0), ("clay", 1.0), ("ink", 0.5), ("late", 1.0), ("ink", 1.0)]
    order += [("meta", 1.0), ("kohya", 0.5), ("mixed", 1.0), ("none", 1.0), ("meta", 1.0)]
    for key, scale in order:
        pixels = _pixels(loaded, None if key == "none" else loras[key], scale)
        # Zero padding changes only the order of float sums: a level at most.
        assert np.abs(pixels - reference[key, scale]).max() <= 1, (key, scale)
    assert np.abs(reference["ink", 1.0] - reference["none", 1.0]).max() > 10
    assert np.abs(reference["ink", 0.5] - reference["ink", 1.0]).max() > 10
    for key in ("meta", "mixed", "kohya"):
        scale = 0.5 if key == "kohya" else 1.0
        assert np.abs(reference[key, scale] - reference["none", 1.0]).max() > 10, key

    # A LoRA the slot cannot hold runs as no style, with the reason in the log; the slot
    # goes on working.
    dora = tmp_path / "dora.safetensors"
    magnitude = {f"unet.{_A_LAYER}.lora_magnitude_vector": torch.ones(32)}
    save_file({**load_file(loras["clay"]), **magnitude}, dora)
    for lora, reason in [
        (loras["wide"], "restart the worker to take it"),
        (loras["ff"], "restart the worker to take it"),
        (dora, "is not a plain LoRA weight"),
    ]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="workers.style_slot"):
            assert not use_lora(loaded, str(lora), 1.0)
        assert reason in caplog.text
        assert np.array_equal(_pixels(loaded, None), reference["none", 1.0])
    assert np.abs(_pixels(loaded, loras["clay"]) - reference["clay", 1.0]).max() <= 1


def test_a_lora_the_slot_cannot_switch_is_refused_at_start(
    tiny_model: Path, loras: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipe = load_pipeline(str(tiny_model), CPU, torch.float32).text2image
    state = load_file(loras["ink"])
    text_only = tmp_path / "text-only.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("unet.")}, text_only)
    with pytest.raises(PresetError, match="it adapts no layer of the UNet"):
        make_style_slot(pipe, [str(text_only)])
    # A DoRA file: its magnitudes are not a LoRA's two projections.
    dora = tmp_path / "dora.safetensors"
    save_file({**state, f"unet.{_A_LAYER}.lora_magnitude_vector": torch.ones(32)}, dora)
    with pytest.raises(PresetError, match="lora_magnitude_vector is not a plain LoRA weight"):
        make_style_slot(pipe, [str(dora)])
    # One layer's down projection of another rank than its up projection.
    uneven = tmp_path / "uneven.safetensors"
    clay = load_file(loras["clay"])
    clay[f"unet.{_A_LAYER}.lora_A.weight"] = clay[f"unet.{_A_LAYER}.lora_A.weight"][:2]
    save_file(clay, uneven)
    with pytest.raises(PresetError, match="up and down projections have different ranks"):
        make_style_slot(pipe, [str(uneven)])
    # A missing or unreadable file is left out, as an uncompiled worker runs without it.
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="workers.style_slot"):
        slot = make_style_slot(
            pipe, [str(tmp_path / "missing.safetensors"), str(broken), str(loras["clay"])]
        )
    assert slot is not None and list(slot.files) == [str(loras["clay"])]
    assert "missing.safetensors does not exist" in caplog.text
    assert "cannot read the style LoRA" in caplog.text and "broken.safetensors" in caplog.text


def test_a_compiled_model_without_a_slot_runs_a_late_lora_without_it(
    tiny_model: Path, loras: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """No catalogue LoRA could be read at start, so there is no slot: a LoRA that appears
    later would, as a named adapter, compile the UNet again at every switch."""
    compiled = Preset(name="c", description="", compile="default")
    loaded = load_pipeline(str(tiny_model), CPU, torch.float32, compiled)
    assert loaded.style_slot is None
    with caplog.at_level(logging.WARNING, logger="workers.pipelines"):
        assert use_lora(loaded, str(loras["late"]), 1.0) is False
    assert "was not known when the compiled worker started" in caplog.text
    assert "restart the worker to take it" in caplog.text
    assert loaded.loras == {} and not getattr(loaded.text2image.unet, "peft_config", None)


# torch.compile at every size: 415 s on the slowest 2-core machine seen (the same before and
# after this test's code changed), over the suite's 300 s.
@pytest.mark.timeout(900)
def test_a_compiled_worker_switches_styles_without_compiling_again(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, loras: dict[str, Path]
) -> None:
    reference = _named_adapters(tiny_model, loras)
    styles = tmp_path / "styles.toml"
    # Only square styles: each size the catalogue's styles use is compiled at warm-up (about
    # a minute and a half more per size on 2 cores), and this test is about the slot.
    builtin_off = "".join(f"[styles.{key}]\nenabled = false\n" for key in load_catalogue().styles)
    styles.write_text(
        '[defaults]\nstyle = "ink"\n'
        + builtin_off
        + "".join(
            f"[styles.{key}]\n"
            f'name = {{ en = "{key}" }}\n'
            f'description = {{ en = "{key}" }}\n'
            f'prompt = "{key} of {{prompt}}"\n'
            'steps = 2\nguidance = 7.0\naspect_ratio = "1:1"\nstrength = 0.6\n'
            f'lora = "{loras[key]}"\n'
            for key in ("ink", "clay")
        )
    )
    presets = tmp_path / "presets.toml"
    presets.write_text(
        '[presets.compiled]\ndescription = "x"\ndtype = "float32"\nfuse_qkv = true\n'
        'compile = "default"\n'
    )
    settings = worker_settings(
        emulator,
        tmp_path,
        tiny_model,
        styles_file=styles,
        presets_file=presets,
        preset="compiled",
        image_size=64,
        max_batch_images=1,
    )
    use_compile_cache(settings.compile_cache_dir)
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    assert usual_sizes(runtime.catalogue, 64) == [(64, 64)]
    try:
        runtime.warm_up()
        loaded = runtime.pipeline
        assert loaded.style_slot is not None
        assert set(loaded.style_slot.files) == {str(loras["ink"]), str(loras["clay"])}
        # From here on, any compile of a graph already compiled once is an error.
        with torch._dynamo.config.patch(error_on_recompile=True):
            for key, scale in [
                ("ink", 1.0),
                ("clay", 1.0),
                ("none", 1.0),
                ("ink", 0.5),
                ("late", 1.0),
                ("clay", 1.0),
            ]:
                pixels = _pixels(loaded, None if key == "none" else loras[key], scale)
                # Compiled kernels may round differently from eager ones.
                assert np.abs(pixels - reference[key, scale]).max() <= 2, (key, scale)
            # An avatar of four images (img2img), though jobs are not batched here: warm-up
            # made the batch dimension dynamic, so it compiles nothing either.
            use_lora(loaded, str(loras["ink"]), 1.0)
            plan = GenerationPlan("ink of a face", 64, 64, 2, (1, 2, 3, 4), 7.0, strength=0.6)
            face = Image.new("RGB", (64, 64), "tan")
            assert len(runtime.identity.avatars(loaded, plan, face, None)) == 4
    finally:
        runtime.close()


def test_the_slot_works_over_quantised_weights(tiny_model: Path, loras: dict[str, Path]) -> None:
    # The int8 presets are compiled: their slot's LoRA layers wrap torchao's quantised ones.
    preset = Preset(name="q", description="", fuse_qkv=True, quantize="int8-weight-only")
    named = load_pipeline(str(tiny_model), CPU, torch.float32, preset)
    slotted = load_pipeline(str(tiny_model), CPU, torch.float32, preset)
    slotted.style_slot = make_style_slot(slotted.text2image, [str(loras["ink"])])
    plain = _pixels(named, None)
    for _ in range(2):
        styled = _pixels(named, loras["ink"])
        assert np.abs(styled - plain).max() > 10
        assert np.abs(_pixels(slotted, loras["ink"]) - styled).max() <= 1
        assert np.array_equal(_pixels(slotted, None), plain)
