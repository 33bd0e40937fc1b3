"""What the on-disk compile cache saves a restarted worker: the warm-up of a compiled preset
in a fresh process, first with an empty cache (it compiles), then again with the cache the
first process left (it reads the kernels back).

    PYTHONPATH=. .venv/bin/python bench/compile_cache.py --runs 3 [--model DIR] [--preset fast]

Each run is two `chitrakar bench` processes sharing one new data dir; the figure is their
`warm_up_seconds` (load excluded: the first call at batch 1, which compiles or loads from the
cache). Prints one JSON object with every run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def warm_up_seconds(model: Path, preset: str, data_dir: Path, size: int) -> float:
    report = data_dir / "bench.json"
    env = {**os.environ, "CHITRAKAR_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "chitrakar",
            "bench",
            "--model",
            str(model),
            "--preset",
            preset,
            "--size",
            str(size),
            "--steps",
            "4",
            "--batches",
            "1",
            "--runs",
            "1",
            "--json",
            str(report),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    seconds: float = json.loads(report.read_text())["warm_up_seconds"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", type=Path, help="a diffusers folder (default: the tiny model)")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from workers.tiny import make_tiny

            model = make_tiny(Path(tmp) / "tiny")
        cold, warm = [], []
        for run in range(args.runs):
            data_dir = Path(tmp) / f"data-{run}"
            cold.append(warm_up_seconds(model, args.preset, data_dir, args.size))
            warm.append(warm_up_seconds(model, args.preset, data_dir, args.size))
            print(f"run {run + 1}: cold {cold[-1]:.1f} s, from the cache {warm[-1]:.1f} s")
    print(
        json.dumps(
            {
                "preset": args.preset,
                "size": args.size,
                "cold_s": cold,
                "cached_s": warm,
                "cold_median_s": statistics.median(cold),
                "cached_median_s": statistics.median(warm),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
