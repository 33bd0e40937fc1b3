"""Pipeline presets as data: choosing one, an operator's file over the built-ins, what each
needs from the hardware, and how a few-step preset changes a job's plan."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from chitrakar.domain import GenerationPlan
from chitrakar.presets import (
    DeviceFacts,
    Preset,
    PresetError,
    adjust_plan,
    load_presets,
    resolved_dtype,
    unmet_needs,
)

CPU = DeviceFacts("cpu")
A100 = DeviceFacts("cuda", (8, 0))
H100 = DeviceFacts("cuda", (9, 0))
T4 = DeviceFacts("cuda", (7, 5))
MAC = DeviceFacts("mps")


def test_the_built_in_presets_load_and_cover_the_issue() -> None:
    catalogue = load_presets()
    assert {"cpu", "fp16", "bf16", "fast", "int8", "fp8", "low-vram", "lcm", "lightning"} <= set(
        catalogue.presets
    )
    fast = catalogue.presets["fast"]
    assert (fast.dtype, fast.fuse_qkv, fast.channels_last, fast.compiled) == (
        "bfloat16",
        True,
        True,
        True,
    )
    assert catalogue.presets["low-vram"].offload == "model"
    assert catalogue.presets["lightning"].steps == 4


def test_every_preset_the_gpu_benchmark_runs_is_defined_and_can_run_on_an_h100() -> None:
    # bench/gpu.sh runs once, on borrowed GPU time: a preset it cannot load wastes the call.
    root = Path(__file__).resolve().parents[2]
    catalogue = load_presets(root / "bench" / "gpu-presets.toml")
    script = (root / "bench" / "gpu.sh").read_text()
    benched = [line.split()[2] for line in script.splitlines() if line.startswith("bench ")]
    assert len(benched) >= 8
    for name in benched:
        assert name in catalogue.presets, name
        assert unmet_needs(catalogue.presets[name], H100) == [], name


@pytest.mark.parametrize(
    ("requested", "model", "device", "chosen"),
    [
        (None, None, "cpu", "cpu"),
        (None, None, "cuda", "gpu"),
        ("auto", "some/model", "cuda", "gpu"),
        (None, None, "mps", "gpu"),
        (None, "stabilityai/sdxl-turbo", "cuda", "turbo"),  # the model's own preset
        # Its guidance goes into the UNet as an embedding of guidance - 1: never 1.0 (0).
        (None, "SimianLuo/LCM_Dreamshaper_v7", "cuda", "lcm-checkpoint"),
        ("fast", "stabilityai/sdxl-turbo", "cuda", "fast"),  # the operator's choice wins
        ("int8", None, "cpu", "int8"),
    ],
)
def test_choosing_a_preset(
    requested: str | None, model: str | None, device: str, chosen: str
) -> None:
    assert load_presets().choose(requested, model, device).name == chosen


@pytest.mark.parametrize(
    ("requested", "model", "steps"),
    [
        ("lightning", None, 4),
        (None, "stabilityai/sdxl-turbo", 1),  # the model's own
        ("fast", "stabilityai/sdxl-turbo", None),
        ("auto", "some/model", None),  # each device's default: none fixes the steps
        (None, None, None),
        ("turbo-max", None, None),  # the worker refuses it
    ],
)
def test_the_steps_every_worker_runs_whatever_the_job_asks(
    requested: str | None, model: str | None, steps: int | None
) -> None:
    assert load_presets().fixed_steps(requested, model) == steps


def test_device_defaults_fix_the_steps_only_when_they_all_do(tmp_path: Path) -> None:
    """An operator's file may make the defaults few-step presets: the bot, which does not know
    the workers' devices, can tell the steps only when every default runs the same."""
    override = tmp_path / "presets.toml"
    gpu_only = '[presets.gpu]\ndescription = "x"\nsteps = 4\nguidance_scale = 0.0\n'
    override.write_text(gpu_only)
    assert load_presets(override).fixed_steps(None, None) is None
    override.write_text(gpu_only + gpu_only.replace("gpu", "cpu"))
    assert load_presets(override).fixed_steps(None, None) == 4


def test_an_unknown_preset_is_refused_with_the_known_ones() -> None:
    with pytest.raises(PresetError, match=r"unknown preset 'turbo-max'.*fast"):
        load_presets().choose("turbo-max", None, "cuda")


def test_an_operator_file_replaces_and_adds(tmp_path: Path) -> None:
    override = tmp_path / "presets.toml"
    override.write_text(
        """
[presets.fast]
description = "our fast: no compile on our old driver"
dtype = "float16"

[presets.house-lightning]
description = "our Lightning LoRA"
scheduler = "euler-trailing"
speed_lora = "/models/sdxl_lightning_4step_lora.safetensors"
steps = 4
guidance_scale = 0.0

[models]
"/models/sdxl" = "house-lightning"
""",
        encoding="utf-8",
    )
    catalogue = load_presets(override)
    assert not catalogue.presets["fast"].compiled  # replaced whole
    assert catalogue.presets["int8"].compiled  # the rest kept
    assert catalogue.choose(None, "/models/sdxl", "cuda").name == "house-lightning"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[presets.x]\ndescription = "x"\ndtype = "float8"\n', r"presets\.x\.dtype"),
        ('[presets.x]\ndescription = "x"\ncompile = "turbo"\n', r"compile must be one of"),
        ('[presets.x]\ndescription = "x"\nsteps = 0\n', r"presets\.x\.steps"),
        ('[presets.x]\ndescription = "x"\nspeed = true\n', r"presets\.x\.speed"),
        ('[models]\n"m" = "nowhere"\n', r"model 'm' names an unknown preset 'nowhere'"),
        ("[presets.x\n", r"not valid TOML"),
        # A misspelt table was ignored without a word: the operator's preset never applied.
        (
            '[preset.gpu]\ndescription = "mine"\ndtype = "float16"\n',
            r"unknown top-level key\(s\) 'preset': the tables are \[presets\.NAME\] and \[models\]",
        ),
        ('[model]\n"my/model" = "turbo"\n', r"unknown top-level key\(s\) 'model'"),
        ('dtype = "float16"\n[Presets.x]\ndescription = "x"\n', r"'Presets', 'dtype'"),
    ],
)
def test_a_bad_presets_file_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    override = tmp_path / "presets.toml"
    override.write_text(text, encoding="utf-8")
    with pytest.raises(PresetError, match=message):
        load_presets(override)


def test_a_missing_presets_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PresetError, match="cannot read the presets file"):
        load_presets(tmp_path / "nowhere.toml")


@pytest.mark.parametrize(
    ("preset", "device", "needs"),
    [
        ("cpu", CPU, []),
        ("fast", CPU, []),
        ("int8", CPU, []),
        ("fp16", CPU, ["float16 on a CPU"]),
        ("low-vram", CPU, ["CPU offload", "float16 on a CPU"]),
        ("low-vram", A100, []),
        ("fp8", A100, ["float8"]),
        ("fp8", H100, []),
        ("fp8", CPU, ["float8"]),
        ("bf16", T4, ["bfloat16"]),
        ("fast", T4, ["bfloat16"]),
        ("fast", MAC, ["torch.compile is not supported on Apple"]),
        ("fast", DeviceFacts("cpu", has_compiler=False), ["C++ compiler"]),
        ("lightning", CPU, []),
    ],
)
def test_what_each_preset_needs(preset: str, device: DeviceFacts, needs: list[str]) -> None:
    reasons = unmet_needs(load_presets().presets[preset], device)
    assert len(reasons) == len(needs)
    for reason, expected in zip(reasons, needs, strict=True):
        assert expected in reason


PLAN = GenerationPlan("a portrait", 512, 512, 25, (1, 2), 7.0)


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        (CPU, "float32"),
        (A100, "bfloat16"),  # no float32 VAE decode for SDXL, unlike float16
        (H100, "bfloat16"),
        (T4, "float16"),  # no bfloat16 tensor cores before Ampere
        (DeviceFacts("cuda"), "float16"),  # capability unknown: the safe choice
        (MAC, "float16"),
    ],
)
def test_auto_precision_follows_the_device(device: DeviceFacts, dtype: str) -> None:
    catalogue = load_presets()
    assert resolved_dtype(catalogue.presets["gpu"], device) == dtype
    assert resolved_dtype(catalogue.presets["lightning"], device) == dtype
    # A preset that names its dtype keeps it everywhere.
    assert resolved_dtype(catalogue.presets["fp16"], device) == "float16"
    assert unmet_needs(catalogue.presets["gpu"], device) == []


def test_a_few_step_preset_fixes_steps_and_guidance() -> None:
    lightning = load_presets().presets["lightning"]
    assert adjust_plan(lightning, PLAN) == GenerationPlan("a portrait", 512, 512, 4, (1, 2), 0.0)


def test_img2img_keeps_at_least_one_step() -> None:
    turbo = load_presets().presets["turbo"]
    upscale = GenerationPlan("x", 1024, 1024, 25, (1,), 7.0, strength=0.35)
    # 1 step × 0.35 would be no step at all: ceil(1 / 0.35) = 3 steps, of which 1 runs.
    assert adjust_plan(turbo, upscale).steps == 3
    # Under a preset that fixes nothing, or none, too: a variation of a `--steps 1`
    # portrait (strength 0.55) runs int(2 × 0.55) = 1 step; `--steps 3` upscaled at 0.3, 1.
    variation = replace(upscale, steps=1, strength=0.55)
    for preset in (load_presets().presets["fast"], None):
        assert adjust_plan(preset, variation).steps == 2
        assert adjust_plan(preset, replace(upscale, steps=3, strength=0.3)).steps == 4
    enough = replace(upscale, steps=3, strength=0.5)
    assert adjust_plan(None, enough) is enough


def test_other_presets_leave_the_plan_alone() -> None:
    assert adjust_plan(load_presets().presets["fast"], PLAN) is PLAN
    assert adjust_plan(None, PLAN) is PLAN
    steps_only = Preset(name="s", description="s", steps=8)
    assert adjust_plan(steps_only, PLAN).guidance_scale == 7.0


def test_an_lcm_checkpoint_is_guided_as_it_was_distilled() -> None:
    presets = load_presets().presets
    lora, checkpoint = presets["lcm"], presets["lcm-checkpoint"]
    # An LCM LoRA runs without classifier-free guidance (1.0); a distilled checkpoint's
    # pipeline embeds w = guidance - 1, and was distilled for w well above 0 (diffusers'
    # example for LCM_Dreamshaper_v7: 8.0).
    assert (lora.scheduler, lora.steps, lora.guidance_scale) == ("lcm", 4, 1.0)
    assert (checkpoint.scheduler, checkpoint.steps, checkpoint.guidance_scale) == ("lcm", 4, 8.0)
