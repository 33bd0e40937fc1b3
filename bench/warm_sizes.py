"""Does a compiled worker's first job at each aspect ratio compile again after its warm-up?

    PYTHONPATH=. python bench/warm_sizes.py WORKDIR [--base 64]

Starts a WorkerRuntime as the worker does (the built-in style catalogue, a compiled preset:
float32, fused QKV, Inductor's default mode, a fresh compile cache), times its warm-up, then
runs one 2-step image at every aspect ratio's size and counts the graphs Dynamo compiled for
it. Run it from an older commit's worktree to compare (it uses nothing newer than the
worker's own start-up).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from torch._dynamo.utils import counters

from chitrakar.config import Settings
from chitrakar.domain import ASPECT_RATIOS, GenerationPlan, image_size
from workers.acceleration import use_compile_cache
from workers.pipelines import text_to_image
from workers.runtime import WorkerRuntime
from workers.tiny import make_tiny

PRESET = (
    '[presets.compiled]\ndescription = "compiled, float32"\ndtype = "float32"\n'
    'fuse_qkv = true\ncompile = "default"\n'
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--base", type=int, default=64, help="CHITRAKAR_IMAGE_SIZE")
    args = parser.parse_args()
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny"
    if not (model / "model_index.json").exists():
        make_tiny(model)
    presets = work / "presets.toml"
    presets.write_text(PRESET)
    settings = Settings(
        data_dir=work / f"data-{time.time_ns()}",  # a fresh compile cache each run
        model=str(model),
        device="cpu",
        presets_file=presets,
        preset="compiled",
        image_size=args.base,
        max_batch_images=1,
    )
    use_compile_cache(settings.compile_cache_dir)
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    try:
        started = time.perf_counter()
        runtime.warm_up()
        print(f"warm-up {time.perf_counter() - started:.1f} s", flush=True)
        for ratio in ASPECT_RATIOS:
            width, height = image_size(ratio, args.base)
            before = counters["stats"]["unique_graphs"]
            started = time.perf_counter()
            text_to_image(runtime.pipeline, GenerationPlan("a cat", width, height, 2, (1,), 7.0))
            seconds = time.perf_counter() - started
            compiled = counters["stats"]["unique_graphs"] - before
            print(f"{ratio} {width}×{height}: {seconds:.2f} s, {compiled} graphs compiled")
    finally:
        runtime.close()


if __name__ == "__main__":
    main()
