"""`chitrakar bench`'s figures on a GPU, with the CUDA calls stood in for (no GPU here)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import workers.benchmark as benchmark
from workers.benchmark import BatchFigures, run_bench

GIB = 2**30


def test_the_json_report_has_the_reserved_peak_beside_the_allocated_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(benchmark, "text_to_image", lambda loaded, plan: calls.append("call"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 9 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 10 * GIB)
    monkeypatch.setattr(benchmark, "machine", lambda device: "NVIDIA Test GPU")
    loaded: Any = SimpleNamespace(device=torch.device("cuda"), preset=None)
    report = run_bench(loaded, model="sdxl", width=64, height=64, steps=2, batches=[1], runs=2)
    assert len(calls) == 3  # a warm-up and two timed calls
    [figures] = report.to_json()["batches"]
    # peak_memory_bytes keeps its meaning (torch.cuda.max_memory_allocated).
    assert figures["peak_memory_bytes"] == 9 * GIB
    assert figures["peak_reserved_bytes"] == 10 * GIB
    # The measured table's rows are unchanged: the allocated peak.
    [row] = benchmark.measurements(report)
    assert row.peak_memory_bytes == 9 * GIB


def test_on_a_cpu_neither_peak_is_measured() -> None:
    figures = BatchFigures(1, 2.0, [2.0], None)
    assert figures.peak_reserved_bytes is None
