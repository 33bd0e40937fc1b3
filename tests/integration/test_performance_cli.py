"""The performance commands as an operator runs them: `chitrakar presets`, `bench` (JSON, a
BENCHMARKS.md row and a measured row that `plan` then reads back), `plan` and `tco`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from chitrakar.capacity import Measurement, append_measurement, load_measurements
from tests.support.stack import chitrakar_process, run_chitrakar
from workers.benchmark import (
    BENCH_HEADING,
    BENCH_TABLE_HEADER,
    BatchFigures,
    BenchReport,
    record,
)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHITRAKAR_")}
    env.update(CHITRAKAR_DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1", **extra)
    return env


def test_bench_measures_records_and_plan_reads_it_back(tmp_path: Path, tiny_model: Path) -> None:
    benchmarks, table, report = (
        tmp_path / "BENCHMARKS.md",
        tmp_path / "m.jsonl",
        tmp_path / "r.json",
    )
    benchmarks.write_text("# Benchmarks\n", encoding="utf-8")
    args = [
        "bench", "--model", str(tiny_model), "--label", "tiny", "--preset", "cpu",
        "--size", "64", "--steps", "2", "--batches", "1,2", "--runs", "3",
        "--json", str(report), "--record", str(benchmarks), "--table", str(table),
    ]  # fmt: skip
    result = run_chitrakar(*args, env=_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    data = json.loads(report.read_text())
    assert (data["model"], data["preset"], data["steps"], data["runs"]) == ("tiny", "cpu", 2, 3)
    assert [b["batch"] for b in data["batches"]] == [1, 2]
    for figures in data["batches"]:
        assert len(figures["calls"]) == 3
        assert figures["seconds_per_call"] == sorted(figures["calls"])[1]  # the median
        assert figures["peak_memory_bytes"] is None  # a CPU has no VRAM to measure
    text = benchmarks.read_text()
    assert text.count("| tiny | cpu | 64×64, 2 |") == 2
    assert "`chitrakar bench --model" in text

    rows = load_measurements(table)
    assert [(row.model, row.batch) for row in rows] == [("tiny", 1), ("tiny", 2)]
    assert all(row.source.startswith("measured: chitrakar bench") for row in rows)

    # Run again: the heading is not repeated, rows are added.
    assert run_chitrakar(*args, env=_env(tmp_path), cwd=tmp_path).returncode == 0
    assert benchmarks.read_text().count("## `chitrakar bench`") == 1
    assert len(load_measurements(table)) == 4

    planned = run_chitrakar(
        "plan", "--gpu-mem", "8GiB", "--model", "tiny", "--table", str(table),
        env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    # The four rows bench recorded are what plan read: measured on this CPU (no VRAM figure,
    # so the preset's fit is unknown, never "yes").
    assert "(0 published, 4 measured" in planned.stdout
    [row] = [line for line in planned.stdout.splitlines() if line.startswith("cpu ")]
    assert row.split()[1] == "?" and "(CPU)" in row


def test_a_bench_stopped_part_way_keeps_the_batch_sizes_it_finished(
    tmp_path: Path, tiny_model: Path
) -> None:
    # As bench/gpu.sh's time limit stops a step: batch 1 is done, batch 48 is still running.
    benchmarks, table, report = tmp_path / "B.md", tmp_path / "m.jsonl", tmp_path / "r.json"
    args = [
        "bench", "--model", str(tiny_model), "--label", "tiny", "--preset", "cpu",
        "--size", "64", "--steps", "2", "--batches", "1,48", "--runs", "3",
        "--json", str(report), "--record", str(benchmarks), "--table", str(table),
    ]  # fmt: skip
    with chitrakar_process(*args, env=_env(tmp_path), log_dir=tmp_path, name="bench") as bench:
        deadline = time.monotonic() + 120

        def kept() -> bool:  # the row written whole (the file exists from its open)
            return table.exists() and table.read_text().endswith("\n")

        while not kept() and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        # Still at batch 48 when the first row is there: leaving the block stops it (SIGTERM).
        assert bench.poll() is None, "bench ended before its first batch size was kept"
    assert [row.batch for row in load_measurements(table)] == [1]
    assert benchmarks.read_text().count("| tiny | cpu | 64×64, 2 |") == 1
    assert [b["batch"] for b in json.loads(report.read_text())["batches"]] == [1]


def test_recorded_rows_go_into_the_bench_table_not_after_what_follows_it(
    tmp_path: Path,
) -> None:
    benchmarks = tmp_path / "BENCHMARKS.md"
    row = "| 2026-11-26 | an older row |"
    benchmarks.write_text(
        f"# Benchmarks\n\n{BENCH_HEADING}\n\n{BENCH_TABLE_HEADER}\n{row}\n\nWhat it shows.\n\n"
        "## A later section\n\n| another | table |\n",
        encoding="utf-8",
    )
    report = BenchReport(
        date="2026-11-27", machine="NVIDIA H200", torch="2.11.0", diffusers="0.42.1",
        model="sdxl", preset="gpu", width=1024, height=1024, steps=30, runs=3,
        warm_up_seconds=2.7, command="chitrakar bench --preset gpu",
        batches=[BatchFigures(1, 1.874, [1.874, 1.864, 2.169], 9 * 2**30)],
    )  # fmt: skip
    record(report, benchmarks, tmp_path / "m.jsonl")

    lines = benchmarks.read_text(encoding="utf-8").splitlines()
    new = lines.index(row) + 1
    assert lines[new].startswith("| 2026-11-27 | NVIDIA H200 |") and "| 9.00 GiB |" in lines[new]
    assert lines[new + 1 :] == ["", "What it shows.", "", "## A later section", "",
                                "| another | table |"]  # fmt: skip
    assert len(load_measurements(tmp_path / "m.jsonl")) == 1


def test_a_preset_the_machine_cannot_run_is_refused_in_one_line(
    tmp_path: Path, tiny_model: Path
) -> None:
    result = run_chitrakar(
        "bench", "--model", str(tiny_model), "--preset", "low-vram", "--size", "64",
        env=_env(tmp_path, CHITRAKAR_DEVICE="cpu"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot benchmark: preset 'low-vram' cannot run on cpu: CPU offload" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_refuses_an_output_it_cannot_write_before_loading_the_model(
    tmp_path: Path,
) -> None:
    # The model does not exist either: the output is checked first, not after a load, a
    # compile and a timed batch.
    result = run_chitrakar(
        "bench", "--model", str(tmp_path / "no-model"), "--size", "64",
        "--record", str(tmp_path / "missing" / "BENCHMARKS.md"), "--table", str(tmp_path / "m"),
        env=_env(tmp_path, CHITRAKAR_DEVICE="cpu"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    # The last line: torch's own warnings may come before it.
    assert result.stderr.splitlines()[-1] == (
        f"cannot benchmark: cannot write {tmp_path}/missing/BENCHMARKS.md: "
        f"{tmp_path}/missing is not a folder"
    )


def test_presets_lists_what_this_machine_can_run(tmp_path: Path) -> None:
    result = run_chitrakar("presets", env=_env(tmp_path, CHITRAKAR_DEVICE="cpu"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "the worker would use: cpu" in result.stdout
    assert "✗ fp8" in result.stdout and "float8 needs an NVIDIA GPU" in result.stdout
    assert "  fast " in result.stdout
    # The preset configured is one this machine cannot run: said at the top, and exit 1.
    fp8 = run_chitrakar(
        "presets", env=_env(tmp_path, CHITRAKAR_DEVICE="cpu", CHITRAKAR_PRESET="fp8"),
        cwd=tmp_path,
    )  # fmt: skip
    assert fp8.returncode == 1
    assert "the worker would refuse to start with: fp8" in fp8.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPU asked for")
def test_a_worker_asked_for_a_gpu_it_does_not_have_says_so_in_one_line(
    tmp_path: Path, tiny_model: Path
) -> None:
    env = _env(tmp_path, CHITRAKAR_DEVICE="cuda", CHITRAKAR_MODEL=str(tiny_model))
    assert run_chitrakar("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    result = run_chitrakar("worker", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "The worker cannot start: CHITRAKAR_DEVICE=cuda, but torch sees no CUDA device"
    )
    assert "Traceback" not in result.stderr


def test_make_tiny_never_replaces_someones_folder(tmp_path: Path) -> None:
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.txt").write_text("important")
    result = run_chitrakar("model", "make-tiny", str(folder), env=_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"{folder} exists and is not a model chitrakar wrote: give a new or empty folder"
    )
    assert [p.name for p in folder.iterdir()] == ["thesis.txt"]


def test_plan_for_an_8_gib_gpu_from_the_packaged_table(tmp_path: Path) -> None:
    result = run_chitrakar(
        "plan", "--gpu-mem", "8GiB", "--model", "sdxl", env=_env(tmp_path), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "sdxl on 8.0 GiB: presets must peak at 7.2 GiB or less" in result.stdout
    # PyTorch's dynamic-int8 SDXL peaks at 7.9 GiB on an A100: over an 8 GiB card's budget.
    assert re.search(r"^int8-dynamic\s+no\s+7\.9 GiB", result.stdout, re.MULTILINE)
    assert "Figures at 1024x1024." in result.stdout
    elsewhere = run_chitrakar(
        "plan", "--gpu-mem", "8GiB", "--model", "sdxl", "--size", "768",
        env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert elsewhere.returncode == 1
    assert "No figures for 'sdxl' at 768x768. Sizes in the table for it: 1024x1024." in (
        elsewhere.stdout
    )
    on_h100 = run_chitrakar(
        "plan", "--gpu-mem", "80GiB", "--model", "sdxl", "--device", "H100",
        env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert on_h100.returncode == 0, on_h100.stderr
    assert "Figures at 1024x1024 on 'H100' only." in on_h100.stdout
    table_rows = [line for line in on_h100.stdout.splitlines() if " steps " in line]
    assert table_rows and all("H100" in line for line in table_rows)
    bad = run_chitrakar(
        "plan", "--gpu-mem", "lots", "--model", "sdxl", env=_env(tmp_path), cwd=tmp_path
    )
    assert bad.returncode == 1 and "lots" in bad.stderr and "Traceback" not in bad.stderr
    # Nothing fits a 4 GiB card (SDXL's least is about 5 GiB): said, and exit 1 for scripts.
    small = run_chitrakar(
        "plan", "--gpu-mem", "4GiB", "--model", "sdxl", env=_env(tmp_path), cwd=tmp_path
    )
    assert small.returncode == 1 and "sdxl on 4.0 GiB" in small.stdout
    assert not re.search(r"^\S+\s+yes\s", small.stdout, re.MULTILINE)


def test_tco_reports_and_plots(tmp_path: Path) -> None:
    plot = tmp_path / "tco.png"
    result = run_chitrakar(
        "tco", "--images-per-second", "0.5", "--hardware-price", "30000",
        "--amortisation-months", "36", "--power-watts", "700", "--electricity-price", "8",
        "--utilisation", "0.6", "--api-price", "0.04", "--currency", "INR",
        "--plot", str(plot), env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # 30,000 / (36 × 730) = 1.1416 an hour; 0.7 kW × 0.6 × 8 = 3.36; 1,080 images an hour:
    # (1.1416 + 3.36) / 1,080 × 1,000 = 4.17 per 1,000.
    assert "4.17 INR" in result.stdout
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 400
    both = run_chitrakar(
        "tco", "--images-per-second", "0.5", "--hardware-price", "1", "--amortisation-months",
        "1", "--hourly-rent", "2", "--power-watts", "700", "--electricity-price", "8",
        "--utilisation", "0.6", env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert both.returncode == 1 and "Traceback" not in both.stderr
    costs = ("--hourly-rent", "2", "--power-watts", "700", "--electricity-price", "8")
    costs += ("--utilisation", "0.5")
    refusals = {
        # A throughput given and a measurement asked for: which one counts is not guessed.
        ("--images-per-second", "0.5", "--model", "sdxl", "--preset", "fast"): (
            "give --images-per-second or a measurement (--model, --preset), not both"
        ),
        ("--images-per-second", "0.5", "--plot", str(tmp_path / "tco.pdf")): (
            f"--plot writes a PNG: give a path ending in .png, not '{tmp_path}/tco.pdf'"
        ),
        ("--images-per-second", "0.5", "--idle-watts", "900"): (
            "idle_watts (900) must not exceed power_watts at load (700)"
        ),
        ("--images-per-second", "1e308"): "images per hour comes out at inf",
        # The packaged table has SDXL `fast` from two A100s: the cost is for one of them.
        ("--model", "sdxl", "--preset", "fast"): "was measured on 2 devices",
    }
    for args, message in refusals.items():
        refused = run_chitrakar("tco", *args, *costs, env=_env(tmp_path), cwd=tmp_path)
        assert refused.returncode == 1, args
        assert message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    chosen = run_chitrakar(
        "tco", "--model", "sdxl", "--preset", "fast", "--device", "A100 80GB", *costs,
        env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert chosen.returncode == 0, chosen.stderr
    assert "steps on NVIDIA A100 80GB" in chosen.stdout


def test_tco_takes_the_throughput_measured_at_the_size_asked_for(tmp_path: Path) -> None:
    table = tmp_path / "measurements.jsonl"
    for side, seconds in ((1024, 2.5), (512, 0.625)):
        append_measurement(
            table,
            Measurement.from_call(
                date="2026-11-27", model="sdxl", preset="fast", device="NVIDIA H100",
                width=side, height=side, steps=30, batch=1, seconds_per_call=seconds,
                peak_memory_bytes=None, runs=3, source="measured: a test",
            ),
        )  # fmt: skip
    costs = ("--hourly-rent", "2", "--power-watts", "700", "--electricity-price", "8")
    costs += ("--utilisation", "0.5", "--table", str(table))

    def tco(*args: str) -> subprocess.CompletedProcess[str]:
        return run_chitrakar(
            "tco", "--model", "sdxl", "--preset", "fast", *args, *costs,
            env=_env(tmp_path), cwd=tmp_path,
        )  # fmt: skip

    assert "throughput: 0.400 images/s" in tco("--size", "1024").stdout
    assert "throughput: 1.600 images/s" in tco("--size", "512").stdout
    missing = tco("--size", "768")
    assert missing.returncode == 1
    assert "no measurement of sdxl with preset fast at 768x768 found" in missing.stderr
