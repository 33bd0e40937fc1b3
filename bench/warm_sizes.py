"""Does a compiled worker's first job at each aspect ratio compile again after its warm-up?

    PYTHONPATH=. python bench/warm_sizes.py WORKDIR [--base 64] [--batch 2] [--lora]

Starts a WorkerRuntime as the worker does (the built-in style catalogue, a compiled preset:
float32, fused QKV, Inductor's default mode, a fresh compile cache), times its warm-up, then
runs one 2-step image at every aspect ratio's size and counts the graphs Dynamo compiled for
it. --batch 2 lets the worker batch (warm-up and jobs of two images too); --lora gives the
built-in 4:5 style "cinematic-portrait" a tiny LoRA, so the UNet gets the style slot (jobs
with and without it). Run it from an older commit's worktree to compare (it uses nothing
newer than the worker's own start-up).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from torch._dynamo.utils import counters

from chitrakar.config import Settings
from chitrakar.domain import ASPECT_RATIOS, GenerationPlan, image_size
from workers.acceleration import use_compile_cache
from workers.pipelines import text_to_image, use_lora
from workers.runtime import WorkerRuntime
from workers.tiny import make_tiny, make_tiny_lora

PRESET = (
    '[presets.compiled]\ndescription = "compiled, float32"\ndtype = "float32"\n'
    'fuse_qkv = true\ncompile = "default"\n'
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--base", type=int, default=64, help="CHITRAKAR_IMAGE_SIZE")
    parser.add_argument("--batch", type=int, default=1, help="CHITRAKAR_MAX_BATCH_IMAGES")
    parser.add_argument("--lora", action="store_true", help="a LoRA style, so a style slot")
    args = parser.parse_args()
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny"
    if not (model / "model_index.json").exists():
        make_tiny(model)
    presets = work / "presets.toml"
    presets.write_text(PRESET)
    styles = None
    lora = None
    if args.lora:
        lora = make_tiny_lora(model, work / "style.safetensors", seed=3)
        styles = work / "styles.toml"
        styles.write_text(  # the built-in style, replaced whole, now with a LoRA
            "[styles.cinematic-portrait]\n"
            'name = { en = "Cinematic portrait" }\n'
            'description = { en = "with a LoRA" }\n'
            'prompt = "cinematic portrait of {prompt}"\naspect_ratio = "4:5"\n'
            f'steps = 2\nguidance = 7.0\nstrength = 0.6\nlora = "{lora}"\n'
        )
    settings = Settings(
        data_dir=work / f"data-{time.time_ns()}",  # a fresh compile cache each run
        model=str(model),
        device="cpu",
        presets_file=presets,
        preset="compiled",
        image_size=args.base,
        max_batch_images=args.batch,
        styles_file=styles,
    )
    use_compile_cache(settings.compile_cache_dir)
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    try:
        started = time.perf_counter()
        runtime.warm_up()
        print(f"warm-up {time.perf_counter() - started:.1f} s", flush=True)
        counts = (1, 2) if args.batch > 1 else (1,)
        loaded = runtime.pipeline
        styles_used = [None, str(lora)] if lora else [None]
        for ratio, style, count in itertools.product(ASPECT_RATIOS, styles_used, counts):
            width, height = image_size(ratio, args.base)
            use_lora(loaded, style, 1.0)
            before = counters["stats"]["unique_graphs"]
            started = time.perf_counter()
            text_to_image(
                loaded, GenerationPlan("a cat", width, height, 2, tuple(range(count)), 7.0)
            )
            seconds = time.perf_counter() - started
            compiled = counters["stats"]["unique_graphs"] - before
            print(
                f"{ratio} {width}×{height}, {count} image(s), {'LoRA' if style else 'no LoRA'}: "
                f"{seconds:.2f} s, {compiled} graphs compiled",
                flush=True,
            )
    finally:
        runtime.close()


if __name__ == "__main__":
    main()
