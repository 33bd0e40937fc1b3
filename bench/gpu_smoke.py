"""The worker's pipeline code on a GPU: `auto` resolves to CUDA, the model loads in half
precision, and the tiny pipeline generates at 64 and 512 pixels. Prints one JSON object.

    PYTHONPATH=. python bench/gpu_smoke.py

Times are the median of 5 calls after one warm-up. The tiny model says nothing about a real
model's speed (that needs a full-size architecture); this checks the device path and the
framework overhead per call.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from chitrakar.domain import GenerationPlan
from workers.pipelines import default_dtype, load_pipeline, resolve_device, text_to_image
from workers.tiny import make_tiny

RUNS = 5


def main() -> None:
    device = resolve_device("auto")
    dtype = default_dtype(device)
    model = make_tiny(Path(tempfile.mkdtemp()) / "tiny")
    started = time.perf_counter()
    loaded = load_pipeline(str(model), device, dtype)
    report: dict[str, object] = {
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
        ),
        "dtype": str(dtype),
        "torch": torch.__version__,
        "load_s": round(time.perf_counter() - started, 3),
        "cases": [],
    }
    for size, steps, images in [(64, 4, 1), (512, 25, 1), (512, 25, 4)]:
        plan = GenerationPlan("a tea stall at dusk", size, size, steps, tuple(range(images)), 7.0)
        text_to_image(loaded, plan)
        times = []
        for _ in range(RUNS):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = text_to_image(loaded, plan)
            times.append(time.perf_counter() - t0)
        pixels = np.stack([np.asarray(image) for image in result])
        report["cases"].append(  # type: ignore[attr-defined]
            {
                "size": size,
                "steps": steps,
                "images": images,
                "median_s": round(statistics.median(times), 4),
                "sizes_ok": all(image.size == (size, size) for image in result),
                "pixel_std": round(float(pixels.std()), 2),
            }
        )
    if device.type == "cuda":
        report["peak_vram_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
