"""Which presets fit a GPU: the measurement table, memory parsing and the plan."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from chitrakar.capacity import (
    BUILTIN_MEASUREMENTS,
    PRESETS,
    Fit,
    Measurement,
    append_measurement,
    budget_bytes,
    format_plan,
    load_measurements,
    measured_on,
    measured_throughput,
    parse_capability,
    parse_memory,
    plan,
    settings_match,
)
from chitrakar.presets import DeviceFacts, Preset, load_presets, unmet_needs

GIB = 2**30


def row(
    preset: str = "fp16",
    *,
    model: str = "sdxl",
    device: str = "NVIDIA H100 80GB HBM3",
    batch: int = 1,
    seconds_per_call: float = 2.0,
    peak: int | None = 8 * GIB,
    source: str = "measured: python bench/gpu_smoke.py --preset fp16",
    size: int = 1024,
) -> Measurement:
    return Measurement.from_call(
        date="2026-11-26",
        model=model,
        preset=preset,
        device=device,
        width=size,
        height=size,
        steps=30,
        batch=batch,
        seconds_per_call=seconds_per_call,
        peak_memory_bytes=peak,
        runs=5,
        source=source,
    )


# --- the packaged table ---


def test_the_packaged_table_loads_and_every_row_says_where_it_comes_from() -> None:
    rows = load_measurements()
    assert rows == load_measurements(BUILTIN_MEASUREMENTS)
    assert {m.model for m in rows} >= {"sdxl", "sd15"}
    for m in rows:
        assert m.source.startswith(("measured:", "published:")), m
        if m.source.startswith("published:"):
            # A published figure names the page it was copied from.
            assert "https://" in m.source, m
    # Every row names a preset a worker knows.
    assert {m.preset for m in rows} <= set(PRESETS)


def test_the_packaged_table_plans_without_error() -> None:
    report = plan(load_measurements(), "SDXL", parse_memory("24GiB"))
    assert report.rows > 0
    assert "Peak = torch.cuda.max_memory_allocated" in format_plan(report)


# --- parse_memory ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * GIB),
        ("8 GiB", 8 * GIB),
        ("8gib", 8 * GIB),
        ("8GB", 8 * 10**9),  # decimal, as on the box
        ("24g", 24 * GIB),  # a bare g is binary, as in nvidia-smi and docker
        ("24G", 24 * GIB),
        ("1.5GiB", 3 * GIB // 2),
        ("512MiB", 512 * 2**20),
        ("512m", 512 * 2**20),
        ("500MB", 500 * 10**6),
        ("64k", 64 * 1024),
        ("1TiB", 2**40),
        ("1048576b", 1048576),
        ("4096 B", 4096),
        ("  16 GiB  ", 16 * GIB),
        # A fraction of a byte (a card's memory as a tool rounds it) is dropped, not refused.
        ("23.65GiB", 25_393_994_137),  # 23.65 x 2^30 = 25,393,994,137.6
        ("1.5B", 1),
    ],
)
def test_parse_memory_reads_the_usual_spellings(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "cannot read"),
        ("lots", "cannot read"),
        ("GiB", "cannot read"),
        ("8 XB", "cannot read"),
        ("8 GiB please", "cannot read"),
        ("8,5GiB", "cannot read"),
        ("0GiB", "more than zero"),
        ("-1GiB", "more than zero"),
        ("0.5B", "'0.5B' is less than one byte"),
        # A number alone is a GPU's gibibytes far more often than bytes: it is refused.
        ("8", "'8' has no unit: write e.g. 8GiB, 8GB or 8B"),
        ("0", "no unit"),
        ("24.5", "no unit"),
    ],
)
def test_parse_memory_refuses_garbage_zero_and_negative(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_memory(text)


# --- reading and writing the table ---


def test_a_row_round_trips_through_a_file(tmp_path: Path) -> None:
    table = tmp_path / "m.jsonl"
    first = row()
    second = replace(row("int8", peak=None), torch="2.9.0+cu128", diffusers="0.42.0")
    append_measurement(table, first)
    append_measurement(table, second)
    assert load_measurements(table) == [first, second]
    # Versions are left out when absent; peak memory is written as null.
    line = json.loads(table.read_text("utf-8").splitlines()[0])
    assert "torch" not in line and line["peak_memory_bytes"] == 8 * GIB


def test_appending_after_a_last_line_without_its_newline(tmp_path: Path) -> None:
    table = tmp_path / "m.jsonl"
    table.write_text(row().to_json(), encoding="utf-8")  # no newline at the end
    append_measurement(table, row("bf16"))
    assert [m.preset for m in load_measurements(table)] == ["fp16", "bf16"]


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    table = tmp_path / "m.jsonl"
    table.write_text(f"\n{row().to_json()}\n   \n{row('bf16').to_json()}\n\n", encoding="utf-8")
    assert len(load_measurements(table)) == 2


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "line 3"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"date": "2026-11-26"}), "missing field"),
        (json.dumps({**json.loads(row().to_json()), "gpu": "x"}), "unknown field"),
        (json.dumps({**json.loads(row().to_json()), "source": "a blog"}), "source must start"),
        (json.dumps({**json.loads(row().to_json()), "width": "1024"}), "width"),
        (json.dumps({**json.loads(row().to_json()), "date": "26/11/2026"}), "YYYY-MM-DD"),
        (json.dumps({**json.loads(row().to_json()), "seconds_per_image": 9.0}), "seconds_per_im"),
        (json.dumps({**json.loads(row().to_json()), "peak_memory_bytes": 0}), "peak_memory"),
    ],
)
def test_a_malformed_line_raises_naming_its_line_number(
    tmp_path: Path, bad_line: str, reason: str
) -> None:
    table = tmp_path / "m.jsonl"
    # Line 1 a good row, line 2 blank, line 3 the bad one.
    table.write_text(f"{row().to_json()}\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=reason) as caught:
        load_measurements(table)
    assert f"{table}, line 3:" in str(caught.value)


def test_a_source_must_say_measured_or_published() -> None:
    with pytest.raises(ValueError, match="source"):
        row(source="published:   ")
    assert row(source="published: https://example.org/post table 2").source


# --- the budget and the fit ---


def test_the_budget_keeps_the_headroom_exactly() -> None:
    # 10 GiB = 10,737,418,240 bytes; x (1 - 0.1) = 9,663,676,416 bytes = 9 GiB exactly.
    assert budget_bytes(10 * GIB, 0.1) == 9 * GIB == 9_663_676_416
    # 24 GiB x 0.85 = 21,904,333,209.6 bytes, rounded down.
    assert budget_bytes(24 * GIB, 0.15) == 21_904_333_209
    assert budget_bytes(8 * GIB, 0) == 8 * GIB


@pytest.mark.parametrize("headroom", [-0.1, 1.0, 1.5, float("nan")])
def test_the_headroom_must_be_a_fraction(headroom: float) -> None:
    with pytest.raises(ValueError, match="headroom"):
        budget_bytes(8 * GIB, headroom)


def test_gpu_memory_must_be_positive() -> None:
    with pytest.raises(ValueError, match="gpu_memory_bytes"):
        plan([], "sdxl", 0)


def test_a_peak_exactly_at_the_budget_fits_and_one_byte_more_does_not() -> None:
    # A 10 GiB GPU with 10 % headroom leaves 9 GiB (9,663,676,416 bytes) for the pipeline.
    on_budget = row("fp16", peak=9 * GIB)
    over = row("bf16", peak=9 * GIB + 1)
    report = plan([on_budget, over], "sdxl", 10 * GIB, headroom_fraction=0.1)
    fits = {p.preset: p.fit for p in report.presets}
    assert fits == {"fp16": Fit.FITS, "bf16": Fit.TOO_BIG}
    assert report.budget_bytes == 9 * GIB
    # Without headroom the 9 GiB + 1 byte preset fits a 10 GiB GPU.
    assert plan([over], "sdxl", 10 * GIB, headroom_fraction=0).presets[0].fit is Fit.FITS


def test_the_highest_peak_at_batch_one_decides_across_devices() -> None:
    # Two measurements of one preset disagree: the plan errs on the side of not fitting.
    rows = [
        row("fp16", device="NVIDIA A100 80GB", peak=10 * GIB, seconds_per_call=3.0),
        row("fp16", device="NVIDIA H100 80GB HBM3", peak=8 * GIB, seconds_per_call=2.0),
        row("fp16", batch=4, peak=20 * GIB),
    ]
    preset = plan(rows, "sdxl", 10 * GIB).presets[0]  # budget 9 GiB
    assert preset.fit is Fit.TOO_BIG
    assert preset.peak_memory_bytes == 10 * GIB
    assert preset.memory is not None and preset.memory.device == "NVIDIA A100 80GB"
    # The speed shown is that row's too, not the faster H100's: one measurement a line.
    assert preset.fastest == preset.memory
    assert plan(rows, "sdxl", 12 * GIB).presets[0].fit is Fit.FITS


PUBLISHED = "published: https://example.org/results.csv row "


def test_rows_measured_with_the_presets_own_settings_decide() -> None:
    # SDXL `fast` as PyTorch published it: without fused QKV (the nearest preset, 8.82 GiB,
    # 2.538 s) and with it (fast's own settings, 9.78 GiB, 2.523 s).
    nearest = row(
        "fast",
        peak=int(8.82 * GIB),
        seconds_per_call=2.538,
        source=PUBLISHED + "fused_qkv_projections=False. Nearest preset 'fast', which fuses QKV.",
    )
    exact = row(
        "fast",
        peak=int(9.78 * GIB),
        seconds_per_call=2.523,
        source=PUBLISHED + "fused_qkv_projections=True. Preset 'fast'.",
    )
    assert (settings_match(nearest), settings_match(exact)) == (False, True)
    for rows in ([nearest, exact], [exact, nearest]):
        fast = plan(rows, "sdxl", 10 * GIB).presets[0]  # budget 9 GiB
        assert fast.fit is Fit.TOO_BIG
        assert fast.memory == exact and fast.fastest == exact
    # Even where the nearest row is the higher: it was not measured with the preset's settings.
    higher = replace(nearest, peak_memory_bytes=12 * GIB)
    assert plan([higher, exact], "sdxl", 11 * GIB).presets[0].fit is Fit.FITS


def test_without_a_row_of_the_presets_own_settings_the_highest_peak_decides() -> None:
    low = row("cpu", peak=5 * GIB, source=PUBLISHED + "float32, eager. Nearest preset 'cpu'.")
    high = row("cpu", peak=8 * GIB, source=PUBLISHED + "float32, nothing said about the preset")
    assert settings_match(high) is None
    cpu = plan([low, high], "sdxl", 8 * GIB).presets[0]  # budget 7.2 GiB
    assert cpu.fit is Fit.TOO_BIG and cpu.memory == high and cpu.fastest == high
    # At a larger batch too: the largest batch that fits is judged on its highest peak.
    rows = [
        row("fp16", peak=4 * GIB),
        row("fp16", batch=2, peak=6 * GIB, device="NVIDIA H200"),
        row("fp16", batch=2, peak=10 * GIB),
    ]
    fp16 = plan(rows, "sdxl", 10 * GIB).presets[0]
    assert fp16.largest_batch is not None and fp16.largest_batch.batch == 1


def test_every_row_of_the_packaged_table_says_whether_it_ran_the_presets_settings() -> None:
    rows = load_measurements()
    assert all(settings_match(m) is not None for m in rows)
    # The reviewer's case: `fast` fits 10 GiB only through the row without fused QKV.
    report = plan(rows, "sdxl", 10 * GIB)
    fast = next(p for p in report.presets if p.preset == "fast")
    assert fast.fit is Fit.TOO_BIG
    assert fast.memory is not None and "Preset 'fast'." in fast.memory.source
    assert fast.fastest == fast.memory
    assert re.search(r"^fast\s+no\s+9\.8 GiB\s.*\s2\.52\s", format_plan(report), re.MULTILINE)


def test_a_preset_whose_memory_was_never_measured_is_not_reported_as_fitting() -> None:
    rows = [row("lcm", peak=None, seconds_per_call=0.5), row("fp16", peak=4 * GIB)]
    report = plan(rows, "sdxl", 80 * GIB)
    assert [p.preset for p in report.fitting] == ["fp16"]
    assert [p.preset for p in report.memory_unknown] == ["lcm"]
    unknown = report.memory_unknown[0]
    assert unknown.peak_memory_bytes is None and unknown.largest_batch is None
    # Its speed is still reported.
    assert unknown.fastest is not None and unknown.fastest.seconds_per_image == 0.5
    text = format_plan(report)
    assert "lcm" in text and "never counted as fitting" in text


def test_memory_measured_only_at_a_larger_batch_is_an_upper_bound() -> None:
    # Memory grows with the batch: batch 4 fitting in 9 GiB means batch 1 fits too; batch 4 not
    # fitting says nothing about batch 1.
    small = row("low-vram", batch=4, peak=6 * GIB, seconds_per_call=16.0)
    big = row("min-vram", batch=4, peak=12 * GIB, seconds_per_call=64.0)
    report = plan([small, big], "sdxl", 10 * GIB)
    assert {p.preset: p.fit for p in report.presets} == {
        "low-vram": Fit.FITS,
        "min-vram": Fit.UNKNOWN,
    }
    low = report.presets[0]
    assert low.peak_memory_bytes is None  # batch 1 itself was not measured
    assert low.largest_batch == small and low.fastest is None
    assert "? (12.0 GiB at 4)" in format_plan(report)


def test_the_largest_measured_batch_that_fits_and_its_throughput() -> None:
    # Budget 9 GiB: batches 1 (5 GiB) and 2 (7 GiB) fit, batch 4 (11 GiB) does not.
    rows = [
        row("fp16", batch=1, peak=5 * GIB, seconds_per_call=2.0),
        row("fp16", batch=2, peak=7 * GIB, seconds_per_call=3.0),
        row("fp16", batch=4, peak=11 * GIB, seconds_per_call=5.0),
    ]
    preset = plan(rows, "sdxl", 10 * GIB).presets[0]
    assert preset.largest_batch is not None
    assert preset.largest_batch.batch == 2
    # 2 images in 3.0 s = 0.667 images/s.
    assert preset.largest_batch.images_per_second == pytest.approx(2 / 3)


def test_the_best_seconds_per_image_at_batch_one_names_its_device() -> None:
    rows = [
        row("fp16", device="NVIDIA A100 80GB", seconds_per_call=3.8, peak=None),
        row("fp16", device="NVIDIA GeForce RTX 4090", seconds_per_call=3.4, peak=None),
        # Faster per image, but at batch 4: not the batch-1 figure.
        row("fp16", device="NVIDIA H100 80GB HBM3", batch=4, seconds_per_call=8.0, peak=None),
    ]
    fastest = plan(rows, "sdxl", 80 * GIB).presets[0].fastest
    assert fastest is not None
    assert (fastest.device, fastest.seconds_per_image) == ("NVIDIA GeForce RTX 4090", 3.4)


def test_presets_are_sorted_fitting_first_then_fastest_first() -> None:
    rows = [
        row("bf16", peak=8 * GIB, seconds_per_call=3.3),
        row("fast", peak=8 * GIB, seconds_per_call=2.5),
        row("cpu", peak=17 * GIB, seconds_per_call=7.4),  # too big for 9 GiB
        row("int8", peak=20 * GIB, seconds_per_call=2.4),  # too big, but faster
        row("lcm", peak=None, seconds_per_call=0.7),  # fastest of all, memory unknown
    ]
    report = plan(rows, "sdxl", 10 * GIB)
    assert [p.preset for p in report.presets] == ["fast", "bf16", "int8", "cpu", "lcm"]
    assert [p.preset for p in report.too_big] == ["int8", "cpu"]


def test_the_plan_does_not_depend_on_the_order_of_the_rows() -> None:
    rows = load_measurements()
    shuffled = list(rows)
    random.Random(7).shuffle(shuffled)
    assert plan(shuffled, "sdxl", 16 * GIB) == plan(rows, "sdxl", 16 * GIB)
    assert format_plan(plan(shuffled, "sdxl", 16 * GIB)) == format_plan(
        plan(rows, "sdxl", 16 * GIB)
    )


def test_two_runs_of_one_command_give_the_same_plan_in_either_order() -> None:
    # The same command run twice on one day: the same source and peak, different timings.
    first, second = row("lightning", seconds_per_call=0.196), row("lightning", seconds_per_call=0.2)
    forwards = plan([first, second], "sdxl", 16 * GIB)
    assert plan([second, first], "sdxl", 16 * GIB) == forwards
    assert forwards.presets[0].memory == first


def test_the_model_label_is_matched_case_insensitively_and_others_are_ignored() -> None:
    rows = [row("fp16", model="SDXL"), row("fp16", model="sd15", peak=3 * GIB)]
    report = plan(rows, "sdxl", 10 * GIB)
    assert report.rows == 1
    assert report.presets[0].memory == rows[0]


def test_an_unknown_model_gets_an_empty_plan_that_lists_the_known_ones() -> None:
    report = plan([row(model="sdxl"), row(model="sd15")], "flux", 24 * GIB)
    assert report.presets == ()
    assert report.known_models == ("sd15", "sdxl")
    assert "No figures for 'flux'. Models in the table: sd15, sdxl." in format_plan(report)


def test_presets_without_any_row_are_listed_as_unmeasured() -> None:
    report = plan([row("fp16")], "sdxl", 24 * GIB)
    assert "fp16" not in report.unmeasured
    assert set(report.unmeasured) == set(PRESETS) - {"fp16"}


def test_format_plan_shows_the_budget_the_headroom_and_numbered_sources() -> None:
    rows = [
        row(
            "fast", peak=9 * GIB, seconds_per_call=2.52, source="published: https://a.example/x t1"
        ),
        row("lcm", peak=None, seconds_per_call=0.7, source="published: https://b.example/y t2"),
    ]
    text = format_plan(plan(rows, "sdxl", 10 * GIB, headroom_fraction=0.1))
    assert "sdxl on 10.0 GiB: presets must peak at 9.0 GiB or less (10% kept" in text
    lines = text.splitlines()
    fast = next(line for line in lines if line.startswith("fast "))
    assert "yes" in fast and "9.0 GiB" in fast and "2.52" in fast and fast.endswith("1")
    assert "[1] https://a.example/x" in lines and "[2] https://b.example/y" in lines
    assert "(2 published, 0 measured on our machines)" in text


# --- image sizes ---


def test_a_smaller_images_memory_never_makes_a_preset_fit_at_a_larger_one() -> None:
    rows = [row("fp16", peak=12 * GIB), row("fp16", peak=4 * GIB, size=512)]
    # One row at each size: the larger is the default.
    at_default = plan(rows, "sdxl", 10 * GIB)
    assert at_default.size == (1024, 1024)
    assert at_default.presets[0].fit is Fit.TOO_BIG
    assert at_default.presets[0].peak_memory_bytes == 12 * GIB
    at_512 = plan(rows, "sdxl", 10 * GIB, size=(512, 512))
    assert at_512.presets[0].fit is Fit.FITS
    assert at_512.presets[0].peak_memory_bytes == 4 * GIB
    assert at_512.sizes == ((1024, 1024), (512, 512))


def test_without_a_size_the_plan_is_at_the_size_measured_most() -> None:
    rows = [row("fp16", size=768), row("bf16", size=768), row("fp16", size=1024)]
    report = plan(rows, "sdxl", 24 * GIB)
    assert report.size == (768, 768)
    assert [p.preset for p in report.presets] == ["bf16", "fp16"]
    assert "bf16" not in report.unmeasured
    # At 1024 only fp16 was measured: bf16 has no figures there.
    at_1024 = plan(rows, "sdxl", 24 * GIB, size=(1024, 1024))
    assert [p.preset for p in at_1024.presets] == ["fp16"]
    assert "bf16" in at_1024.unmeasured


def test_the_plan_says_its_size_and_the_others_measured() -> None:
    rows = [row("fp16"), row("fp16", size=512)]
    text = format_plan(plan(rows, "sdxl", 24 * GIB))
    assert "Figures at 1024x1024 (also measured: 512x512; --size to choose)." in text
    only = format_plan(plan([row("fp16")], "sdxl", 24 * GIB))
    assert "Figures at 1024x1024." in only


def test_a_size_with_no_figures_gets_an_empty_plan_that_lists_the_sizes_there_are() -> None:
    rows = [row("fp16"), row("fp16", size=512)]
    report = plan(rows, "sdxl", 24 * GIB, size=(768, 768))
    assert report.presets == ()
    text = format_plan(report)
    assert (
        "No figures for 'sdxl' at 768x768. Sizes in the table for it: 1024x1024, 512x512." in text
    )


# --- devices ---


def test_with_a_device_only_its_rows_count_and_the_heading_says_so() -> None:
    rows = [
        row("lightning", device="NVIDIA H200", seconds_per_call=0.36),
        row("lightning", device="NVIDIA H100 80GB HBM3", seconds_per_call=0.52),
        row("low-vram", device="NVIDIA H200", peak=5 * GIB),
    ]
    every = plan(rows, "sdxl", 24 * GIB)
    assert every.presets[0].fastest == rows[0]
    on_h100 = plan(rows, "sdxl", 24 * GIB, device=" h100 ")
    assert [p.preset for p in on_h100.presets] == ["lightning"]
    assert on_h100.presets[0].fastest == rows[1]
    assert on_h100.rows == 1 and "low-vram" in on_h100.unmeasured
    assert on_h100.devices == ("NVIDIA H100 80GB HBM3", "NVIDIA H200")
    assert "Figures at 1024x1024 on 'h100' only." in format_plan(on_h100)
    assert "only." not in format_plan(every)


def test_a_device_with_no_figures_gets_an_empty_plan_that_lists_the_devices_there_are() -> None:
    rows = [row(device="NVIDIA H200"), row(device="NVIDIA Tesla T4"), row(model="sd15")]
    report = plan(rows, "sdxl", 24 * GIB, device="RTX 5090")
    assert report.presets == ()
    assert (
        "No figures for 'sdxl' on a device named like 'RTX 5090'. "
        "Devices in the table for it: NVIDIA H200; NVIDIA Tesla T4."
    ) in format_plan(report)
    with pytest.raises(ValueError, match="the device name is empty"):
        plan(rows, "sdxl", 24 * GIB, device="  ")
    # An unknown model still says so, device or not.
    assert "No figures for 'flux'. Models in the table" in format_plan(
        plan(rows, "flux", 24 * GIB, device="H200")
    )


@pytest.mark.parametrize(
    ("device", "expected"),
    [(None, True), ("H100", True), ("h100 80gb", True), ("H200", False), ("A100", False)],
)
def test_measured_on_matches_part_of_the_device_name_in_any_case(
    device: str | None, expected: bool
) -> None:
    assert measured_on(row(device="NVIDIA H100 80GB HBM3"), device) is expected


# --- the GPU's compute capability ---

TURING = (7, 5)  # an RTX 2080 Ti or a T4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7.5", (7, 5)),
        ("8.6", (8, 6)),
        ("8.9", (8, 9)),
        ("9.0", (9, 0)),
        ("8", (8, 0)),
        ("12.0", (12, 0)),
    ],
)
def test_parse_capability(text: str, expected: tuple[int, int]) -> None:
    assert parse_capability(text) == expected


@pytest.mark.parametrize("text", ["", "turing", "7.55", "7,5", "0.0", "-8.0", "sm_75"])
def test_parse_capability_refuses_what_is_not_one(text: str) -> None:
    with pytest.raises(ValueError, match=r"compute capability: write e\.g\. 7\.5"):
        parse_capability(text)


def test_presets_an_old_gpu_cannot_run_are_not_reported_as_fitting() -> None:
    presets = load_presets().presets
    rows = [row("bf16", peak=8 * GIB), row("fp16", peak=8 * GIB), row("fast", peak=9 * GIB)]
    report = plan(rows, "sdxl", 11 * GIB, capability=TURING, presets=presets)
    assert [p.preset for p in report.fitting] == ["fp16"]
    assert {p.preset for p in report.cannot_run} == {"bf16", "fast"}
    bf16 = next(p for p in report.presets if p.preset == "bf16")
    assert bf16.fit is Fit.CANNOT_RUN and "bfloat16 needs" in bf16.cannot_run[0]
    assert report.presets[-1].fit is Fit.CANNOT_RUN  # after the others
    text = format_plan(report)
    assert re.search(r"^bf16\s+cannot run\s+8\.0 GiB", text, re.MULTILINE)
    assert "Checked against compute capability 7.5." in text
    assert (
        "Cannot run at 7.5 (bfloat16 needs an NVIDIA GPU of compute capability 8.0 or newer): "
        in text
    )
    # An Ada card runs them all.
    ada = plan(rows, "sdxl", 11 * GIB, capability=(8, 9), presets=presets)
    assert {p.preset for p in ada.fitting} == {"bf16", "fp16", "fast"}


def test_below_8_0_auto_presets_are_judged_on_their_float16_twins() -> None:
    presets = load_presets().presets
    rows = [
        row("gpu", peak=int(8.98 * GIB), seconds_per_call=1.87),  # bfloat16 on an H100
        row("lightning", peak=int(8.98 * GIB), seconds_per_call=0.36),
        row("fp16", peak=int(11.52 * GIB), seconds_per_call=2.31),
        row("fp16", batch=2, peak=int(14.76 * GIB), seconds_per_call=2.69),
    ]
    report = plan(rows, "sdxl", 11 * GIB, capability=TURING, presets=presets)  # budget 9.9 GiB
    for name in ("gpu", "lightning"):
        p = next(p for p in report.presets if p.preset == name)
        assert p.fit is Fit.TOO_BIG, name
        assert p.memory == rows[2] and p.memory_from == ("fp16",)
        # The speed is still the preset's own (4 steps for lightning, not fp16's 30).
        assert p.fastest is not None and p.fastest.preset == name
    text = format_plan(report)
    assert re.search(r"^gpu\s+no\s+11\.5 GiB \(fp16\)\s", text, re.MULTILINE)
    assert "At 7.5 'auto' presets run in float16: the peaks of" in text
    # From Ampere on they run in bfloat16: their own rows count.
    ampere = plan(rows, "sdxl", 11 * GIB, capability=(8, 0), presets=presets)
    assert {p.preset for p in ampere.fitting} == {"gpu", "lightning"}
    assert all(not p.memory_from for p in ampere.presets)
    # Without a float16 twin's row, an auto preset keeps its own.
    alone = plan(rows[:2], "sdxl", 11 * GIB, capability=TURING, presets=presets)
    assert {p.preset for p in alone.fitting} == {"gpu", "lightning"}


def test_the_packaged_table_on_an_11_gib_turing_card() -> None:
    # The reviewer's case: an RTX 2080 Ti (11 GiB, 7.5) was told bf16, fast, int8-dynamic...
    # fit, and gpu and lightning at their bfloat16 peaks.
    turing = DeviceFacts("cuda", TURING)
    presets = load_presets().presets
    report = plan(load_measurements(), "sdxl", 11 * GIB, capability=TURING, presets=presets)
    assert report.fitting
    for p in report.fitting:
        assert not unmet_needs(presets[p.preset], turing), p.preset
    for name in ("gpu", "lightning"):
        p = next(p for p in report.presets if p.preset == name)
        assert p.fit is not Fit.FITS and p.memory_from == ("fp16",)
    assert {"bf16", "fast", "int8-dynamic"} <= {p.preset for p in report.cannot_run}


def test_without_a_capability_the_plan_says_it_was_not_checked() -> None:
    text = format_plan(plan([row("bf16")], "sdxl", 11 * GIB))
    assert "Compute capability not checked: give --capability" in text
    assert "Compute capability not checked" not in format_plan(
        plan([row("bf16")], "sdxl", 11 * GIB, capability=(9, 0), presets=load_presets().presets)
    )
    with pytest.raises(ValueError, match="needs the presets"):
        plan([row("bf16")], "sdxl", 11 * GIB, capability=(9, 0))


def test_a_preset_the_presets_do_not_define_is_named_as_not_checked() -> None:
    presets = {"fp16": Preset(name="fp16", description="f", dtype="float16")}
    report = plan([row("fp16"), row("house")], "sdxl", 24 * GIB, capability=TURING, presets=presets)
    assert report.unchecked == ("house",)
    assert {p.preset for p in report.fitting} == {"fp16", "house"}
    assert "Not among the presets, so not checked: house." in format_plan(report)


# --- the throughput a cost is worked from ---


def test_the_fastest_row_of_the_model_and_preset_on_the_one_device() -> None:
    rows = [
        row("fast", batch=1, seconds_per_call=2.0),
        row("fast", batch=4, seconds_per_call=6.0),  # 0.67 images a second, the best
        row("fast", size=512, seconds_per_call=0.5),
        row("fp16", seconds_per_call=0.1),
        row("fast", model="sd15", seconds_per_call=0.1),
    ]
    assert measured_throughput(rows, "SDXL", "fast", size=(1024, 1024), batch=4) == rows[1]
    assert measured_throughput(rows, "sdxl", "fast", device=" h100 ") == rows[2]


def test_the_throughput_is_at_batch_one_unless_another_batch_is_asked_for() -> None:
    # A lone job runs at batch 1: a GPU seldom busy never fills a batch of 4.
    rows = [
        row("fast", batch=1, seconds_per_call=2.0),  # 0.5 images a second
        row("fast", batch=4, seconds_per_call=6.0),  # 0.67
    ]
    assert measured_throughput(rows, "sdxl", "fast", size=(1024, 1024)) == rows[0]
    assert measured_throughput(rows, "sdxl", "fast", batch=4) == rows[1]
    with pytest.raises(ValueError) as refused:
        measured_throughput(rows, "sdxl", "fast", batch=2)
    assert str(refused.value) == (
        "no measurement of sdxl with preset fast at batch 2; measured at batch 1, 4"
    )
    with pytest.raises(ValueError, match="batch size must be a whole number"):
        measured_throughput(rows, "sdxl", "fast", batch=0)


def test_the_throughput_comes_from_the_presets_own_settings_where_known() -> None:
    exact = row("fast", seconds_per_call=2.523, source=PUBLISHED + "Preset 'fast'.")
    nearest = row("fast", seconds_per_call=2.0, source=PUBLISHED + "Nearest preset 'fast'.")
    assert measured_throughput([nearest, exact], "sdxl", "fast") == exact
    assert measured_throughput([nearest], "sdxl", "fast") == nearest


def test_rows_from_several_devices_must_be_narrowed_to_one() -> None:
    # The same preset at 0.39 images a second on an A100 and 0.005 on a CPU: a cost worked
    # from the fastest would price the CPU at the A100's speed.
    rows = [
        row("cpu", device="NVIDIA A100 80GB", seconds_per_call=2.5),
        row("cpu", device="NVIDIA A100 40GB", seconds_per_call=2.6),
        row("cpu", device="cpu", seconds_per_call=200.0),
    ]
    with pytest.raises(ValueError) as refused:
        measured_throughput(rows, "sdxl", "cpu")
    assert str(refused.value) == (
        "sdxl with preset cpu was measured on 3 devices (NVIDIA A100 40GB; NVIDIA A100 80GB; "
        "cpu): choose the one the prices are for with --device, e.g. --device 'cpu'"
    )
    with pytest.raises(ValueError, match="measured on 2 devices"):
        measured_throughput(rows, "sdxl", "cpu", device="A100")
    assert measured_throughput(rows, "sdxl", "cpu", device="a100 40gb") == rows[1]
    assert measured_throughput(rows, "sdxl", "cpu", device="cpu") == rows[2]


def test_no_row_blank_device_and_the_packaged_table() -> None:
    rows = [row("fast")]
    with pytest.raises(ValueError, match="no measurement of sdxl with preset fast at 768x768"):
        measured_throughput(rows, "sdxl", "fast", size=(768, 768))
    with pytest.raises(ValueError, match="on a device named like 'T4'"):
        measured_throughput(rows, "sdxl", "fast", device="T4")
    with pytest.raises(ValueError, match="the device name is empty"):
        measured_throughput(rows, "sdxl", "fast", device=" ")
    # The README's example: SDXL `fast` was measured on two A100s.
    with pytest.raises(ValueError, match="measured on 2 devices"):
        measured_throughput(load_measurements(), "sdxl", "fast")
    chosen = measured_throughput(load_measurements(), "sdxl", "fast", device="A100 80GB")
    assert chosen.device == "NVIDIA A100 80GB"
