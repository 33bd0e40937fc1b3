"""Where a preset's speed LoRA comes from: a local file, or a file in a Hub repository. A
missing local file is named as missing, never looked up on the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chitrakar.presets import PresetError
from workers.acceleration import SPEED_ADAPTER, _fuse_speed_lora, speed_lora_source


class FakePipe:
    """Records what diffusers would have been asked to load."""

    def __init__(self) -> None:
        self.loaded: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.fused = False

    def load_lora_weights(self, *args: Any, **kwargs: Any) -> None:
        self.loaded.append((args, kwargs))

    def fuse_lora(self, **_: Any) -> None:
        self.fused = True

    def unload_lora_weights(self) -> None:
        pass


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "missing",
    [
        "/models/sdxl_lightning_4step_lora.safetensors",
        "./lcm-lora-sdxl.safetensors",
        "../loras/lcm-lora-sdxl.safetensors",
        "~/no-such-folder-here/lcm.safetensors",
        "loras/lcm-lora-sdxl.safetensors",  # one folder: not org/repo/file
        "lcm-lora-sdxl.safetensors",
        "lcm-lora-sdxl.bin",
    ],
)
def test_a_missing_local_file_is_refused_by_name_before_diffusers_is_asked(
    in_tmp: Path, missing: str
) -> None:
    pipe = FakePipe()
    with pytest.raises(PresetError) as refused:
        _fuse_speed_lora(pipe, missing, 1.0)
    assert str(refused.value).startswith(f"speed_lora file {missing!r} does not exist")
    assert pipe.loaded == [] and not pipe.fused


def test_a_path_whose_folder_exists_here_is_a_local_file(in_tmp: Path) -> None:
    # "org/repo/file" in form, but org/repo is a folder here: a missing local file.
    (in_tmp / "latent-consistency" / "lcm-lora-sdxl").mkdir(parents=True)
    source = "latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors"
    with pytest.raises(PresetError, match=r"^speed_lora file .* does not exist$"):
        speed_lora_source(source)
    (in_tmp / "a-folder.safetensors").mkdir()
    with pytest.raises(PresetError, match=r"'a-folder\.safetensors' is not a file"):
        speed_lora_source("a-folder.safetensors")


def test_a_local_file_and_a_hub_file(in_tmp: Path) -> None:
    lora = in_tmp / "loras" / "lcm.safetensors"
    lora.parent.mkdir()
    lora.write_bytes(b"")
    assert speed_lora_source("loras/lcm.safetensors") == (str(Path("loras/lcm.safetensors")), None)
    assert speed_lora_source(str(lora)) == (str(lora), None)
    source = "ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors"
    assert speed_lora_source(source) == (
        "ByteDance/SDXL-Lightning",
        "sdxl_lightning_4step_lora.safetensors",
    )
    pipe = FakePipe()
    _fuse_speed_lora(pipe, source, 1.0)
    assert pipe.loaded == [
        (
            ("ByteDance/SDXL-Lightning",),
            {"weight_name": "sdxl_lightning_4step_lora.safetensors", "adapter_name": SPEED_ADAPTER},
        )
    ]
    assert pipe.fused


@pytest.mark.parametrize(
    "source",
    ["org/repo/sub/file.safetensors", "org//file.safetensors", "org/repo/file.bin"],
)
def test_only_org_repo_file_safetensors_is_a_hub_file(in_tmp: Path, source: str) -> None:
    with pytest.raises(PresetError, match=r"not a Hub file 'org/repo/file\.safetensors'"):
        speed_lora_source(source)
