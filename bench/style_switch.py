"""A compiled worker switching style LoRAs: what each job's generation takes, and how many
graphs torch.compile makes after the warm-up.

    PYTHONPATH=. .venv/bin/python bench/style_switch.py [--model PATH] [--preset NAME]
        [--device auto] [--size 64] [--steps 2] [--rounds 2] [--workdir DIR]

Without --model, the tiny model and three tiny LoRAs are made in a temporary folder (two in
the worker's catalogue, one not: a style added after the worker started). With --model, the
three LoRAs are random ones of the same shape for that model (`workers.tiny.make_tiny_lora`
works on any SD 1.5 folder). The preset is the named one from the catalogue, or by default a
compiled float32 preset with fused QKV (the "fast" preset's parts a CPU runs well).
`--workdir` keeps the model and LoRAs (made once, then reused: an older checkout, run with
its own PYTHONPATH, then measures the same files) and starts each run with an empty
compile cache.

The model is loaded as the worker loads it (`load_pipeline` with the catalogue's LoRA files,
where the code takes them) and warmed up as the worker does; then each round runs one
generation per switch: ink, clay, no style, ink at half scale, the late LoRA, no style. Each
line of output is one JSON object; the last is the summary.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo.utils

from chitrakar.domain import GenerationPlan
from chitrakar.presets import Preset, load_presets
from workers.acceleration import preset_dtype, use_compile_cache
from workers.pipelines import load_pipeline, resolve_device, text_to_image, use_lora
from workers.tiny import make_tiny, make_tiny_lora


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--preset")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    folder = args.workdir or Path(tempfile.mkdtemp(prefix="style-switch-"))
    folder.mkdir(parents=True, exist_ok=True)
    use_compile_cache(Path(tempfile.mkdtemp(prefix="compile-cache-", dir=folder)))
    model = args.model or folder / "tiny"
    if not (model / "model_index.json").exists():
        make_tiny(model)

    def lora(name: str, **options: Any) -> Path:
        path = folder / f"{name}.safetensors"
        return path if path.exists() else make_tiny_lora(model, path, **options)

    loras = {
        "ink": lora("ink", seed=1, text_encoder=True),
        "clay": lora("clay", seed=2, rank=8, unet_targets=("to_q", "to_v")),
        "late": lora("late", seed=3),
    }
    catalogue = [str(loras["ink"]), str(loras["clay"])]
    if args.preset:
        preset = load_presets().presets[args.preset]
    else:
        preset = Preset(
            name="compiled", description="", dtype="float32", fuse_qkv=True, compile="default"
        )
    device = resolve_device(args.device)
    takes_styles = "style_loras" in inspect.signature(load_pipeline).parameters
    started = time.perf_counter()
    if takes_styles:
        loaded = load_pipeline(str(model), device, preset_dtype(preset, device), preset, catalogue)
    else:  # code from before the style slot
        loaded = load_pipeline(str(model), device, preset_dtype(preset, device), preset)
    load_seconds = time.perf_counter() - started
    plan = GenerationPlan("a lighthouse at dusk", args.size, args.size, args.steps, (7,), 7.0)

    def generate(lora: str | None, scale: float) -> float:
        use_lora(loaded, lora, scale)
        began = time.perf_counter()
        text_to_image(loaded, plan)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - began

    # As WorkerRuntime.warm_up: no style, and a style when the slot is there.
    slot = getattr(loaded, "style_slot", None)
    warm_styles: list[str | None] = [None, catalogue[0]] if slot is not None else [None]
    started = time.perf_counter()
    for style in warm_styles:
        generate(style, 1.0)
    use_lora(loaded, None, 1.0)
    warm_up_seconds = time.perf_counter() - started
    after_warm_up = graphs()

    switches: list[tuple[str, str | None, float]] = [
        ("ink", str(loras["ink"]), 1.0),
        ("clay", str(loras["clay"]), 1.0),
        ("none", None, 1.0),
        ("ink@0.5", str(loras["ink"]), 0.5),
        ("late", str(loras["late"]), 1.0),
        ("none", None, 1.0),
    ]
    seconds: list[float] = []
    for round_ in range(args.rounds):
        for name, lora, scale in switches:
            took = generate(lora, scale)
            seconds.append(took)
            row: dict[str, Any] = {
                "round": round_ + 1,
                "switch": name,
                "seconds": round(took, 3),
                "graphs": graphs(),
            }
            print(json.dumps(row), flush=True)
    summary = {
        "device": str(device),
        "preset": preset.name,
        "model": str(args.model) if args.model else "tiny",
        "size": args.size,
        "steps": args.steps,
        "style_slot": slot is not None,
        "load_seconds": round(load_seconds, 2),
        "warm_up_seconds": round(warm_up_seconds, 2),
        "graphs_after_warm_up": after_warm_up,
        "graphs_compiled_by_jobs": graphs() - after_warm_up,
        "job_seconds_median": round(statistics.median(seconds), 3),
        "job_seconds_max": round(max(seconds), 3),
        "job_seconds_total": round(sum(seconds), 2),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
