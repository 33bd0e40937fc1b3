"""What a worker does to each result before it is sent, besides the pipeline call: the NudeNet
content check and the PNG encoding, one image at a time, in this process.

    PYTHONPATH=. .venv/bin/python bench/result_path.py [--runs 5] [--images 20]

The image is a photograph (scikit-image's astronaut, resized to 512² and 1024²), which
compresses like a generated one; a flat test colour would flatter the encoder. Measured:
- the content check: NudeNet's own `NudeDetector.detect` against the worker's detector
  (`workers.classifier.NudeNetDetector`, same detections), on a quiet machine and with one
  core kept busy by another process (as when the bot or a second worker runs beside it);
- the check as the worker runs it, from the generated PIL image to its verdict
  (`OutputClassifier.classify_all`): one image, and per image of a job's four (`/avatar`'s
  default), which go through the model in one run;
- PNG encoding with Pillow at its default level (6), and as results are written
  (`chitrakar.media.png_bytes`), with the file's size;
- the check and the encoding one after the other, and overlapped as the worker runs them.

Each figure is the median over `--runs` runs of the per-image median of `--images` images.
Prints one JSON object (milliseconds, KiB).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image
from skimage import data as photographs

from bench.serving_overhead import machine
from chitrakar.media import PNG_COMPRESS_LEVEL, png_bytes
from workers.classifier import NudeNetDetector, OutputClassifier


def _spin(stop: Any) -> None:
    while not stop.is_set():
        pass


@contextmanager
def one_core_busy() -> Iterator[None]:
    stop = multiprocessing.Event()
    process = multiprocessing.Process(target=_spin, args=(stop,))
    process.start()
    try:
        yield
    finally:
        stop.set()
        process.join()


def median_ms(work: Callable[[], object], images: int, runs: int) -> float:
    work()  # warm
    per_run = []
    for _ in range(runs):
        times = []
        for _ in range(images):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        per_run.append(statistics.median(times))
    return round(1000 * statistics.median(per_run), 1)


def figures_at(size: int, ours: NudeNetDetector, nudenets: Any, images: int, runs: int) -> Any:
    image = Image.fromarray(photographs.astronaut()).resize((size, size), Image.LANCZOS)
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])

    def measure(work: Callable[[], object]) -> float:
        return median_ms(work, images, runs)

    def encoded(level: int) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    def overlapped() -> None:
        with ThreadPoolExecutor(1) as checker:
            checking = checker.submit(ours.detect, bgr)
            png_bytes(image)
            checking.result()

    classifier = OutputClassifier()
    classifier._detector = ours
    figures: dict[str, Any] = {
        "check_nudenet_quiet": measure(lambda: nudenets.detect(bgr)),
        "check_worker_quiet": measure(lambda: ours.detect(bgr)),
        "classify_one_image": measure(lambda: classifier.classify_all([image])),
        "classify_per_image_of_four": round(
            measure(lambda: classifier.classify_all([image] * 4)) / 4, 1
        ),
    }
    with one_core_busy():
        figures["check_nudenet_one_core_busy"] = measure(lambda: nudenets.detect(bgr))
        figures["check_worker_one_core_busy"] = measure(lambda: ours.detect(bgr))
    figures["png_default_level"] = measure(lambda: encoded(6))
    figures["png_result_level"] = measure(lambda: png_bytes(image))
    figures["png_kib"] = {
        "default_level": len(encoded(6)) // 1024,
        "result_level": len(png_bytes(image)) // 1024,
    }
    figures["check_then_encode"] = measure(lambda: (ours.detect(bgr), png_bytes(image)))
    figures["check_while_encoding"] = measure(overlapped)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args()
    ours = NudeNetDetector()
    nudenets = importlib.import_module("nudenet").NudeDetector()
    report: dict[str, Any] = {"machine": machine(), "runs": args.runs, "images": args.images}
    for size in (512, 1024):
        report[f"{size}x{size}"] = figures_at(size, ours, nudenets, args.images, args.runs)
    report["result_level"] = PNG_COMPRESS_LEVEL
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
