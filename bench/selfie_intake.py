"""What the bot spends on a selfie before it answers: decode with every check, find the face,
level and crop it (`chitrakar.photos.prepare_selfie`), on real photographs.

    PYTHONPATH=. .venv/bin/python bench/selfie_intake.py [--runs 15]

Photos: scikit-image's astronaut (512×512 JPEG), the same scaled to a phone camera's 12 MP
(4000×3000, JPEG quality 90), and as HEIC; plus a refused bomb (a 20000×20000 PNG header) to
show that refusing it costs no decoding. Prints one JSON object: median and p95 in ms.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

from PIL import Image
from skimage import data as photographs

from chitrakar.photos import PhotoRejected, prepare_selfie

SIZE = 512


def encoded(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def bomb() -> bytes:
    return encoded(Image.new("1", (20_000, 20_000)), "PNG")


def timed(call: Callable[[], object], runs: int) -> dict[str, float]:
    call()  # warm-up: cascades load once per process
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(samples), 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 1),
    }


def refused(data: bytes) -> Callable[[], object]:
    def call() -> object:
        try:
            prepare_selfie(data, SIZE)
        except PhotoRejected as exc:
            return exc.key
        raise AssertionError("the bomb was not refused")

    return call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    astronaut = Image.fromarray(photographs.astronaut())
    photos = {
        "astronaut 512x512 JPEG": encoded(astronaut, "JPEG", quality=90),
        "astronaut 4000x3000 JPEG": encoded(
            astronaut.resize((3000, 3000)).crop((-500, 0, 3500, 3000)), "JPEG", quality=90
        ),
        "astronaut 512x512 HEIC": encoded(astronaut, "HEIF"),
    }
    results: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "output_size": SIZE,
        "runs": args.runs,
    }
    for name, data in photos.items():
        results[name] = {
            "bytes": len(data),
            **timed(lambda d=data: prepare_selfie(d, SIZE), args.runs),
        }
    bomb_bytes = bomb()
    results["20000x20000 PNG bomb (refused)"] = {
        "bytes": len(bomb_bytes),
        **timed(refused(bomb_bytes), args.runs),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
