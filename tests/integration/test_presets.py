"""Every built-in preset builds and generates with the tiny model on this machine's CPU;
presets this CPU cannot run are skipped with the reason the worker would refuse them with.
Then what the presets' parts do: the compile cache on disk, a fused few-step LoRA under
style LoRAs, and fused QKV giving way to a style LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler

from chitrakar.domain import GenerationPlan
from chitrakar.presets import Preset, PresetError, adjust_plan, load_presets
from workers.acceleration import check_preset, preset_dtype, use_compile_cache
from workers.pipelines import LoadedPipeline, load_pipeline, text_to_image, use_lora
from workers.tiny import make_tiny_lora

CPU = torch.device("cpu")
PLAN = GenerationPlan("a lighthouse at dusk", 64, 64, 3, (7, 8), 7.0)
CATALOGUE = load_presets()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("compile-cache")
    use_compile_cache(folder)
    return folder


def _load(model: Path, preset: Preset) -> LoadedPipeline:
    return load_pipeline(str(model), CPU, preset_dtype(preset, CPU), preset)


def _array(image: Any) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("name", sorted(CATALOGUE.presets))
def test_each_preset_builds_and_generates_on_this_cpu(
    name: str, tiny_model: Path, compile_cache: Path
) -> None:
    preset = CATALOGUE.presets[name]
    try:
        check_preset(preset, CPU)
    except PresetError as refused:
        pytest.skip(str(refused))
    loaded = _load(tiny_model, preset)
    steps: list[tuple[int, int]] = []
    images = text_to_image(loaded, PLAN, lambda done, total: steps.append((done, total)))

    assert [image.size for image in images] == [(64, 64), (64, 64)]
    pixels = np.stack([_array(image) for image in images])
    assert pixels.std() > 0, "a blank image"
    # Few-step presets run their own number of steps, whatever the job asked for.
    expected = adjust_plan(preset, PLAN).steps
    assert steps[-1] == (expected, expected)

    pipe = loaded.text2image
    assert pipe.unet.dtype == preset_dtype(preset, CPU)
    if preset.scheduler == "lcm":
        assert isinstance(pipe.scheduler, LCMScheduler)
    if preset.scheduler == "euler-trailing":
        assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
        assert pipe.scheduler.config.timestep_spacing == "trailing"
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    if preset.fuse_qkv:
        assert loaded.qkv_fused and processors == {"FusedAttnProcessor2_0"}
    else:
        expected_processor = "AttnProcessor2_0" if preset.attention == "sdpa" else "AttnProcessor"
        assert processors == {expected_processor}
    conv = pipe.vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == preset.channels_last
    if preset.quantize != "none":
        linear = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear))
        weight = linear.weight
        assert "Int8" in type(weight).__name__ or "Float8" in type(weight).__name__
    assert pipe.vae.use_slicing == preset.vae_slicing
    assert pipe.vae.use_tiling == preset.vae_tiling
    assert (getattr(pipe.unet, "_compiled_call_impl", None) is not None) == preset.compiled
    if preset.compiled:
        # Compiled kernels are kept on disk: a restarted worker reads them back.
        assert any(compile_cache.rglob("*")), "nothing was written to the compile cache"


def test_presets_the_cpu_cannot_run_are_refused_with_the_reason() -> None:
    with pytest.raises(PresetError, match=r"preset 'low-vram' cannot run on cpu: CPU offload"):
        check_preset(CATALOGUE.presets["low-vram"], CPU)
    with pytest.raises(PresetError, match="float8 needs an NVIDIA GPU"):
        check_preset(CATALOGUE.presets["fp8"], CPU)


def test_a_fused_speed_lora_changes_the_model_and_style_loras_still_switch(
    tiny_model: Path, tmp_path: Path
) -> None:
    speed = make_tiny_lora(tiny_model, tmp_path / "speed.safetensors", seed=1)
    style = make_tiny_lora(tiny_model, tmp_path / "style.safetensors", seed=2)
    plain_preset = Preset(name="lcm", description="", scheduler="lcm", steps=2, guidance_scale=1.0)
    fast_preset = plain_preset.model_copy(update={"speed_lora": str(speed)})
    plain = _array(text_to_image(_load(tiny_model, plain_preset), PLAN)[0])
    loaded = _load(tiny_model, fast_preset)
    # Fused into the weights and unloaded: no adapter is left to switch.
    assert loaded.text2image.get_list_adapters() == {}
    fast = _array(text_to_image(loaded, PLAN)[0])
    assert np.abs(fast - plain).max() > 0

    assert use_lora(loaded, str(style), 1.0)
    styled = _array(text_to_image(loaded, PLAN)[0])
    assert np.abs(styled - fast).max() > 0
    use_lora(loaded, None, 1.0)
    assert np.array_equal(_array(text_to_image(loaded, PLAN)[0]), fast)


def test_a_missing_speed_lora_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    preset = Preset(name="x", description="", speed_lora=str(tmp_path / "nowhere.bin"))
    with pytest.raises(PresetError, match=r"speed_lora file '.*nowhere\.bin' does not exist"):
        _load(tiny_model, preset)


def test_fused_qkv_gives_way_to_a_style_lora_and_comes_back(
    tiny_model: Path, tmp_path: Path
) -> None:
    style = make_tiny_lora(tiny_model, tmp_path / "style.safetensors", seed=3)
    loaded = _load(tiny_model, Preset(name="fused", description="", fuse_qkv=True))
    fused = _array(text_to_image(loaded, PLAN)[0])
    assert use_lora(loaded, str(style), 1.0)
    # Fused attention would not read the LoRA's query/key/value layers: it is off meanwhile.
    assert not loaded.qkv_fused
    assert np.abs(_array(text_to_image(loaded, PLAN)[0]) - fused).max() > 0
    use_lora(loaded, None, 1.0)
    assert loaded.qkv_fused
    assert np.array_equal(_array(text_to_image(loaded, PLAN)[0]), fused)


def test_a_style_lora_switches_on_and_off_under_quantised_fused_attention(
    tiny_model: Path, tmp_path: Path
) -> None:
    # torchao cannot concatenate its quantised weights: the fused projections are made once,
    # before quantisation, and a LoRA only switches processors.
    style = make_tiny_lora(tiny_model, tmp_path / "style.safetensors", seed=4)
    preset = Preset(name="q", description="", fuse_qkv=True, quantize="int8-weight-only")
    loaded = _load(tiny_model, preset)
    plain = _array(text_to_image(loaded, PLAN)[0])
    for _ in range(2):
        assert use_lora(loaded, str(style), 1.0) and not loaded.qkv_fused
        assert np.abs(_array(text_to_image(loaded, PLAN)[0]) - plain).max() > 0
        use_lora(loaded, None, 1.0)
        assert loaded.qkv_fused
        assert np.array_equal(_array(text_to_image(loaded, PLAN)[0]), plain)
