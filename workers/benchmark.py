"""`chitrakar bench`: latency per image and images per second at several batch sizes, and the
peak GPU memory, for one model under one preset, through the worker's own loading and
pipeline call. Each figure is the median of several timed calls after a warm-up (which also
compiles a compiled preset)."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter
from typing import Any

import diffusers
import torch

from chitrakar.capacity import Measurement, append_measurement
from chitrakar.domain import GenerationPlan
from chitrakar.presets import adjust_plan
from workers.pipelines import LoadedPipeline, text_to_image

PROMPT = "a cinematic portrait of a grandmother in a Kerala saree, soft window light"
BENCH_HEADING = "## `chitrakar bench`: one model, one preset, batch sizes"
BENCH_TABLE_HEADER = (
    "| date | machine | torch, diffusers | model | preset | size, steps | batch | s per call "
    "(median of runs) | s per image | images/s | peak VRAM | command |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


@dataclass(frozen=True)
class BatchFigures:
    batch: int
    seconds_per_call: float  # median
    calls: list[float]
    peak_memory_bytes: int | None  # torch.cuda.max_memory_allocated: the tensors' peak
    # torch.cuda.max_memory_reserved: what PyTorch's caching allocator held from the GPU at
    # its peak (tensors plus cached blocks), nearer what nvidia-smi shows. JSON output only.
    peak_reserved_bytes: int | None = None

    @property
    def seconds_per_image(self) -> float:
        return self.seconds_per_call / self.batch

    @property
    def images_per_second(self) -> float:
        return self.batch / self.seconds_per_call


@dataclass
class BenchReport:
    date: str
    machine: str
    torch: str
    diffusers: str
    model: str
    preset: str
    width: int
    height: int
    steps: int
    runs: int
    warm_up_seconds: float
    command: str
    batches: list[BatchFigures] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["batches"] = [
            {
                **asdict(figures),
                "seconds_per_image": figures.seconds_per_image,
                "images_per_second": figures.images_per_second,
            }
            for figures in self.batches
        ]
        return data


def machine(device: torch.device) -> str:
    """The device in words: a GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (CPU)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    loaded: LoadedPipeline,
    *,
    model: str,
    width: int,
    height: int,
    steps: int,
    batches: Sequence[int],
    runs: int,
    on_batch: Callable[[BenchReport, BatchFigures], None] | None = None,
) -> BenchReport:
    """Time `runs` calls per batch size after one warm-up call at that size. `on_batch` is
    called with the report so far as each size is done, so that a run stopped part way (a
    time limit on borrowed GPU time) keeps the sizes it finished."""
    device, preset = loaded.device, loaded.preset
    plan = GenerationPlan(PROMPT, width, height, steps, (0,), guidance_scale=7.0)
    steps = adjust_plan(preset, plan).steps
    report = BenchReport(
        date=datetime.now(UTC).date().isoformat(),
        machine=machine(device),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        model=model,
        preset=preset.name if preset else "none",
        width=width,
        height=height,
        steps=steps,
        runs=runs,
        warm_up_seconds=0.0,
        command="chitrakar " + " ".join(sys.argv[1:]),
    )
    for batch in batches:
        batch_plan = GenerationPlan(PROMPT, width, height, plan.steps, tuple(range(batch)), 7.0)
        started = perf_counter()
        text_to_image(loaded, batch_plan)  # warm-up: allocations, autotuning, compilation
        _synchronize(device)
        report.warm_up_seconds += perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        calls = []
        for _ in range(runs):
            started = perf_counter()
            text_to_image(loaded, batch_plan)
            _synchronize(device)
            calls.append(perf_counter() - started)
        peak = reserved = None
        if device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(device))
            reserved = int(torch.cuda.max_memory_reserved(device))
        figures = BatchFigures(batch, statistics.median(calls), calls, peak, reserved)
        report.batches.append(figures)
        if on_batch is not None:
            on_batch(report, figures)
    return report


def measurements(report: BenchReport) -> list[Measurement]:
    """The report as rows of the measured table `chitrakar plan` reads."""
    return [
        Measurement.from_call(
            date=report.date,
            model=report.model,
            preset=report.preset,
            device=report.machine,
            width=report.width,
            height=report.height,
            steps=report.steps,
            batch=figures.batch,
            seconds_per_call=figures.seconds_per_call,
            peak_memory_bytes=figures.peak_memory_bytes,
            runs=report.runs,
            source=f"measured: {report.command}",
            torch=report.torch,
            diffusers=report.diffusers,
        )
        for figures in report.batches
    ]


def record(report: BenchReport, benchmarks_md: Path, table: Path) -> None:
    """Add the report's rows to BENCHMARKS.md's bench table (the heading and the table made
    once, at the end) and to the measured table."""
    rows = measurements(report)  # checked before anything is written
    text = benchmarks_md.read_text(encoding="utf-8") if benchmarks_md.exists() else ""
    lines = []
    for figures in report.batches:
        peak = (
            f"{figures.peak_memory_bytes / 2**30:.2f} GiB"
            if figures.peak_memory_bytes is not None
            else "—"
        )
        lines.append(
            f"| {report.date} | {report.machine} | {report.torch}, {report.diffusers} | "
            f"{report.model} | {report.preset} | {report.width}×{report.height}, {report.steps} | "
            f"{figures.batch} | {figures.seconds_per_call:.3f} s ({report.runs}) | "
            f"{figures.seconds_per_image:.3f} s | {figures.images_per_second:.2f} | {peak} | "
            f"`{report.command}` |"
        )
    benchmarks_md.write_text(_with_rows(text, lines), encoding="utf-8")
    for row in rows:
        append_measurement(table, row)


def _with_rows(text: str, rows: list[str]) -> str:
    """`text` with `rows` at the end of the bench table (whatever prose follows it), or with
    the heading and the table added at the end when it has none."""
    lines = text.splitlines()
    if BENCH_HEADING not in lines:
        ending = "" if not text or text.endswith("\n") else "\n"
        return text + ending + "\n".join(["", BENCH_HEADING, "", BENCH_TABLE_HEADER, *rows]) + "\n"
    at = lines.index(BENCH_HEADING) + 1
    while at < len(lines) and not lines[at].startswith("|"):  # to the table
        at += 1
    while at < len(lines) and lines[at].startswith("|"):  # past its last row
        at += 1
    return "\n".join(lines[:at] + rows + lines[at:]) + "\n"


def format_report(report: BenchReport) -> str:
    head = (
        f"{report.model} with preset {report.preset} on {report.machine}: "
        f"{report.width}×{report.height}, {report.steps} steps, median of {report.runs} calls "
        f"(warm-up {report.warm_up_seconds:.1f} s)"
    )
    rows = [f"{'batch':>5}  {'s/call':>8}  {'s/image':>8}  {'images/s':>8}  peak VRAM"]
    for figures in report.batches:
        peak = (
            f"{figures.peak_memory_bytes / 2**30:.2f} GiB"
            if figures.peak_memory_bytes is not None
            else "— (CPU)"
        )
        rows.append(
            f"{figures.batch:>5}  {figures.seconds_per_call:>8.3f}  "
            f"{figures.seconds_per_image:>8.3f}  {figures.images_per_second:>8.2f}  {peak}"
        )
    return "\n".join([head, *rows])
