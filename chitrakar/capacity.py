"""Which pipeline presets fit a GPU, judged from the table of measurements in the repository.

The table is JSON Lines, `measurements.jsonl` beside this module: one `Measurement` a line, each
either measured on our own machines (`source` "measured: <the command>") or copied from a
publication (`source` "published: <URL> <what was measured there>"). Nothing here guesses a
figure: a preset whose memory was never measured is reported as "memory unknown", never as
fitting.

`plan` is a pure function of the rows it is given; only `load_measurements` and
`append_measurement` touch files.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from decimal import ROUND_FLOOR, Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

# capacity.py -> measurements.jsonl, the package data file beside this module.
BUILTIN_MEASUREMENTS = Path(__file__).with_name("measurements.jsonl")

# The presets a worker can run (the names of chitrakar/presets.toml), and what each one is.
# Rows may name others (a preset can be measured before it is listed here); these are the ones
# a plan lists as "no figures yet".
PRESETS: Mapping[str, str] = {
    "cpu": "float32, SDPA attention",
    "gpu": "bfloat16 (float16 before Ampere), SDPA",
    "fp16": "float16, SDPA",
    "bf16": "bfloat16, SDPA",
    "fast": "bf16 + SDPA + fused QKV + channels_last + torch.compile",
    "fast-default-compile": "fast, compiled in mode 'default' (no autotuning)",
    "int8": "fast + torchao int8 weight-only",
    "int8-dynamic": "fast + torchao dynamic int8 (weights and activations)",
    "fp8": "fast + float8 (Ada, Hopper)",
    "low-vram": "fp16 + VAE slicing and tiling + model CPU offload",
    "min-vram": "fp16 + VAE slicing and tiling + sequential CPU offload",
    "lcm": "few steps: LCM scheduler and LoRA",
    "lcm-checkpoint": "few steps: a distilled LCM checkpoint, its guidance embedded",
    "lightning": "few steps: SDXL-Lightning or Hyper-SD",
    "lightning-compiled": "lightning in bf16 + fused QKV + channels_last + torch.compile (default)",
    "turbo": "one step: SDXL-Turbo or SD-Turbo",
}

SOURCE_PREFIXES = ("measured:", "published:")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_PRESET_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# The derived columns (seconds per image, images per second) are stored for people reading the
# file; they must agree with seconds_per_call and batch to this tolerance (rounding in hand-made
# rows).
_DERIVED_TOLERANCE = 0.01


@dataclass(frozen=True)
class Measurement:
    """One timed configuration.

    `date` is when it was measured, or for a published figure, when it was copied here (not all
    sources date their runs). `seconds_per_call` is the median of `runs` timed calls; `runs` is
    0 where a source does not say how many (its text then says what the figure is).
    `peak_memory_bytes` is torch.cuda.max_memory_allocated over the call, None where not
    measured (always on CPU).
    """

    date: str
    model: str
    preset: str
    device: str
    width: int
    height: int
    steps: int
    batch: int
    seconds_per_call: float
    seconds_per_image: float
    images_per_second: float
    peak_memory_bytes: int | None
    runs: int
    source: str
    torch: str | None = None
    diffusers: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.date, str) or not _DATE.fullmatch(self.date):
            raise ValueError(f"date {self.date!r} is not YYYY-MM-DD")
        try:
            dt.date.fromisoformat(self.date)
        except ValueError:
            raise ValueError(f"date {self.date!r} is not a day of the calendar") from None
        for name in ("model", "device"):
            if not _nonblank(getattr(self, name)):
                raise ValueError(f"{name} must be a non-empty string")
        if not isinstance(self.preset, str) or not _PRESET_NAME.fullmatch(self.preset):
            raise ValueError(f"preset {self.preset!r} must be lower-case words joined by '-'")
        for name in ("width", "height", "steps", "batch"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer")
        for name in ("seconds_per_call", "seconds_per_image", "images_per_second"):
            if not _positive_number(getattr(self, name)):
                raise ValueError(f"{name} must be a positive number")
        if self.peak_memory_bytes is not None and not _positive_int(self.peak_memory_bytes):
            raise ValueError("peak_memory_bytes must be a positive integer or null")
        if not _int(self.runs) or self.runs < 0:
            raise ValueError("runs must be an integer >= 0 (0: the source does not say)")
        if not isinstance(self.source, str) or not any(
            self.source.startswith(prefix) and self.source[len(prefix) :].strip()
            for prefix in SOURCE_PREFIXES
        ):
            raise ValueError("source must start with 'measured: ' or 'published: ' and say more")
        for name in ("torch", "diffusers"):
            value = getattr(self, name)
            if value is not None and not _nonblank(value):
                raise ValueError(f"{name} must be a non-empty string or absent")
        if not math.isclose(
            self.seconds_per_image, self.seconds_per_call / self.batch, rel_tol=_DERIVED_TOLERANCE
        ):
            raise ValueError("seconds_per_image is not seconds_per_call / batch")
        if not math.isclose(
            self.images_per_second, self.batch / self.seconds_per_call, rel_tol=_DERIVED_TOLERANCE
        ):
            raise ValueError("images_per_second is not batch / seconds_per_call")

    @classmethod
    def from_call(
        cls,
        *,
        date: str,
        model: str,
        preset: str,
        device: str,
        width: int,
        height: int,
        steps: int,
        batch: int,
        seconds_per_call: float,
        peak_memory_bytes: int | None,
        runs: int,
        source: str,
        torch: str | None = None,
        diffusers: str | None = None,
    ) -> Self:
        """A row whose derived columns are computed from `seconds_per_call` and `batch`."""
        if not _positive_number(seconds_per_call) or not _positive_int(batch):
            raise ValueError("seconds_per_call and batch must be positive")
        return cls(
            date=date,
            model=model,
            preset=preset,
            device=device,
            width=width,
            height=height,
            steps=steps,
            batch=batch,
            seconds_per_call=seconds_per_call,
            seconds_per_image=seconds_per_call / batch,
            images_per_second=batch / seconds_per_call,
            peak_memory_bytes=peak_memory_bytes,
            runs=runs,
            source=source,
            torch=torch,
            diffusers=diffusers,
        )

    def to_json(self) -> str:
        """One line of the table (no newline); absent versions are left out."""
        row = {k: v for k, v in asdict(self).items() if v is not None or k == "peak_memory_bytes"}
        return json.dumps(row, ensure_ascii=False)

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> Self:
        """A row read from JSON. Unknown keys are refused, so a misspelt field is noticed."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(row) - known)
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(unknown)}")
        required = {f.name for f in fields(cls) if f.name not in ("torch", "diffusers")}
        missing = sorted(required - set(row))
        if missing:
            raise ValueError(f"missing field(s): {', '.join(missing)}")
        return cls(**row)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: object) -> bool:
    return _int(value) and value > 0  # type: ignore[operator]


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _nonblank(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def load_measurements(path: Path | None = None) -> list[Measurement]:
    """The rows of a table (default: the packaged one). Blank lines are skipped; a line that is
    not a valid row raises ValueError naming the file and line number."""
    path = BUILTIN_MEASUREMENTS if path is None else path
    rows: list[Measurement] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise ValueError("a row must be a JSON object")
                rows.append(Measurement.from_mapping(data))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}, line {number}: {exc}") from None
    return rows


def append_measurement(path: Path, m: Measurement) -> None:
    """Add one row at the end of a table, creating the file if need be."""
    prefix = ""
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as existing:
            existing.seek(-1, 2)
            # A last line without its newline would otherwise be joined to the new row.
            if existing.read(1) != b"\n":
                prefix = "\n"
    with path.open("a", encoding="utf-8") as table:
        table.write(prefix + m.to_json() + "\n")


_MEMORY = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*([a-z]*)")
_UNITS = {
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": 2**30,
    "gib": 2**30,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}


def parse_memory(text: str) -> int:
    """Bytes from "8GiB", "8 GiB", "8GB" (10^9), "24g" (a bare k/m/g/t is binary, as in
    nvidia-smi and docker), "512MiB" or "4096B". Case does not matter. A number without a
    unit is refused: "8" is far likelier a GPU's gibibytes than 8 bytes."""
    match = _MEMORY.fullmatch(text.strip().lower())
    if match is not None and not match.group(2):
        raise ValueError(
            f"{text!r} has no unit: write e.g. {match.group(1)}GiB, {match.group(1)}GB "
            f"or {match.group(1)}B"
        )
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as an amount of memory: write e.g. 8GiB, 8GB, 24g or 512MiB"
        )
    number, unit = Decimal(match.group(1)), _UNITS[match.group(2)]
    amount = number * unit
    if amount <= 0:
        raise ValueError(f"memory must be more than zero, not {text!r}")
    if amount != amount.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(amount)


class Fit(StrEnum):
    """Whether a preset fits in the memory budget."""

    FITS = "fits"
    TOO_BIG = "too big"
    UNKNOWN = "memory unknown"


@dataclass(frozen=True)
class PresetPlan:
    """What the table says about one preset of one model.

    `memory` is the row the fit was judged on: the lowest peak at batch 1; where batch 1 was
    never measured, the smallest fitting batch (memory grows with the batch, so batch 1 fits
    too) or, when none fits, the smallest batch measured (then `fit` is UNKNOWN). `largest_batch`
    is the largest measured batch that fits; `fastest` the best seconds per image at batch 1.
    """

    preset: str
    fit: Fit
    memory: Measurement | None
    largest_batch: Measurement | None
    fastest: Measurement | None

    @property
    def peak_memory_bytes(self) -> int | None:
        """The lowest measured peak at batch 1, None where batch 1 was not measured."""
        if self.memory is None or self.memory.batch != 1:
            return None
        return self.memory.peak_memory_bytes


Size = tuple[int, int]  # width, height


@dataclass(frozen=True)
class PlanReport:
    """`presets` in order: fitting first, then too big, then memory unknown; fastest first
    within each. Every figure is at `size`, the one asked for or, when none was, the size the
    model has the most rows at; `sizes` are all the model's sizes in the table, largest first.
    `unmeasured` lists the known presets with no row at all for the model at `size`. With
    `device`, only rows measured on a device whose name contains it count; `devices` are all
    the model's devices in the table."""

    model: str
    gpu_memory_bytes: int
    headroom_fraction: float
    budget_bytes: int
    size: Size | None
    sizes: tuple[Size, ...]
    presets: tuple[PresetPlan, ...]
    unmeasured: tuple[str, ...]
    known_models: tuple[str, ...]
    sources: tuple[str, ...]
    rows: int
    measured_rows: int
    device: str | None = None
    devices: tuple[str, ...] = ()

    @property
    def fitting(self) -> tuple[PresetPlan, ...]:
        return tuple(p for p in self.presets if p.fit is Fit.FITS)

    @property
    def too_big(self) -> tuple[PresetPlan, ...]:
        return tuple(p for p in self.presets if p.fit is Fit.TOO_BIG)

    @property
    def memory_unknown(self) -> tuple[PresetPlan, ...]:
        return tuple(p for p in self.presets if p.fit is Fit.UNKNOWN)


def _tiebreak(m: Measurement) -> tuple[str, str, str, int, int, int, float, int, str, str]:
    # Makes every choice below independent of the order of the rows, down to two runs of one
    # command on one day (the same source) that differ only in their timings.
    return (
        m.device,
        m.date,
        m.source,
        m.width,
        m.height,
        m.steps,
        m.seconds_per_call,
        m.runs,
        m.torch or "",
        m.diffusers or "",
    )


def budget_bytes(gpu_memory_bytes: int, headroom_fraction: float) -> int:
    """The memory a pipeline may use: the GPU's less the headroom, in whole bytes. The fraction
    is taken as written (0.1 is exactly a tenth), so a figure on the boundary fits."""
    if not _positive_int(gpu_memory_bytes):
        raise ValueError("gpu_memory_bytes must be a positive integer")
    if not (
        isinstance(headroom_fraction, int | float)
        and not isinstance(headroom_fraction, bool)
        and 0 <= headroom_fraction < 1
    ):
        raise ValueError("headroom_fraction must be at least 0 and below 1")
    share = Decimal(1) - Decimal(repr(float(headroom_fraction)))
    return int((Decimal(gpu_memory_bytes) * share).to_integral_value(rounding=ROUND_FLOOR))


def _plan_preset(preset: str, rows: Sequence[Measurement], budget: int) -> PresetPlan:
    with_memory = [m for m in rows if m.peak_memory_bytes is not None]
    fitting = [
        m for m in with_memory if m.peak_memory_bytes is not None and m.peak_memory_bytes <= budget
    ]

    def peak(m: Measurement) -> int:
        return m.peak_memory_bytes or 0

    at_one = [m for m in with_memory if m.batch == 1]
    memory: Measurement | None
    if at_one:
        memory = min(at_one, key=lambda m: (peak(m), _tiebreak(m)))
        fit = Fit.FITS if peak(memory) <= budget else Fit.TOO_BIG
    elif fitting:
        memory = min(fitting, key=lambda m: (m.batch, peak(m), _tiebreak(m)))
        fit = Fit.FITS
    elif with_memory:
        memory = min(with_memory, key=lambda m: (m.batch, peak(m), _tiebreak(m)))
        fit = Fit.UNKNOWN
    else:
        memory, fit = None, Fit.UNKNOWN

    largest = (
        min(fitting, key=lambda m: (-m.batch, -m.images_per_second, _tiebreak(m)))
        if fitting
        else None
    )
    batch_one = [m for m in rows if m.batch == 1]
    fastest = (
        min(batch_one, key=lambda m: (m.seconds_per_image, _tiebreak(m))) if batch_one else None
    )
    return PresetPlan(preset, fit, memory, largest, fastest)


def _speed(plan: PresetPlan, rows: Sequence[Measurement]) -> float:
    # Batch 1 where measured; otherwise the best the preset did at any batch.
    if plan.fastest is not None:
        return plan.fastest.seconds_per_image
    return min(m.seconds_per_image for m in rows)


_FIT_ORDER = {Fit.FITS: 0, Fit.TOO_BIG: 1, Fit.UNKNOWN: 2}


def _size_of(m: Measurement) -> Size:
    return m.width, m.height


def _usual_size(rows: Sequence[Measurement]) -> Size | None:
    """The size with the most rows; of those, the largest. None for no rows."""
    counts = Counter(_size_of(m) for m in rows)
    if not counts:
        return None
    return max(counts, key=lambda size: (counts[size], size[0] * size[1], size))


def measured_on(m: Measurement, device: str | None) -> bool:
    """Whether `m` was measured on a device whose name contains `device` (any case); every
    row is, for None. "H100" matches "NVIDIA H100 80GB HBM3"."""
    return device is None or device.strip().casefold() in m.device.casefold()


def _device_wanted(device: str | None) -> str | None:
    """A `--device` as given, stripped; a blank one is refused (it would match every row)."""
    if device is None:
        return None
    if not device.strip():
        raise ValueError("the device name is empty: give part of one, e.g. H100")
    return device.strip()


def measured_throughput(
    measurements: Iterable[Measurement],
    model: str,
    preset: str,
    device: str | None = None,
    size: Size | None = None,
) -> Measurement:
    """The fastest row (images a second) for `model` under `preset`, on `device` (see
    `measured_on`) and at `size` where given. The rows must come from one device: a cost is
    for one GPU, and the same preset ran 0.39 images a second on an A100 and 0.005 on a CPU.
    Raises ValueError, naming the devices to choose from, when they do not."""
    device = _device_wanted(device)
    wanted = model.strip().casefold()
    rows = [
        m
        for m in measurements
        if m.model.casefold() == wanted
        and m.preset == preset
        and measured_on(m, device)
        and (size is None or _size_of(m) == size)
    ]
    at = f" at {_format_size(size)}" if size is not None else ""
    on = f" on a device named like {device!r}" if device is not None else ""
    if not rows:
        raise ValueError(f"no measurement of {model} with preset {preset}{at}{on} found")
    devices = sorted({m.device for m in rows})
    if len(devices) > 1:
        raise ValueError(
            f"{model} with preset {preset}{at} was measured on {len(devices)} devices "
            f"({'; '.join(devices)}): choose the one the prices are for with --device, "
            "e.g. --device '" + devices[-1] + "'"
        )
    return max(rows, key=lambda m: (m.images_per_second, _tiebreak(m)))


def plan(
    measurements: Iterable[Measurement],
    model: str,
    gpu_memory_bytes: int,
    headroom_fraction: float = 0.1,
    size: Size | None = None,
    device: str | None = None,
) -> PlanReport:
    """Which of the model's presets fit `gpu_memory_bytes`, keeping `headroom_fraction` of it
    for the CUDA context and fragmentation (a preset fits when its peak <= memory x (1 - h)).
    Only rows at one image size count (memory and time grow with the pixels): `size`, or the
    size the model was measured at most. With `device`, only rows measured on a device of
    that name (see `measured_on`): `gpu` took 3.15 s an image on the H100 measured here and
    1.87 s on the H200.
    The model label is matched case-insensitively."""
    budget = budget_bytes(gpu_memory_bytes, headroom_fraction)
    device = _device_wanted(device)
    every = list(measurements)
    wanted = model.strip().casefold()
    every_device = [m for m in every if m.model.casefold() == wanted]
    of_model = [m for m in every_device if measured_on(m, device)]
    sizes = sorted({_size_of(m) for m in of_model}, key=lambda s: (-s[0] * s[1], -s[0]))
    size = size if size is not None else _usual_size(of_model)
    rows = [m for m in of_model if _size_of(m) == size]
    by_preset: dict[str, list[Measurement]] = {}
    for m in rows:
        by_preset.setdefault(m.preset, []).append(m)
    plans = [(_plan_preset(p, r, budget), r) for p, r in by_preset.items()]
    plans.sort(key=lambda pr: (_FIT_ORDER[pr[0].fit], _speed(pr[0], pr[1]), pr[0].preset))
    return PlanReport(
        model=model,
        gpu_memory_bytes=gpu_memory_bytes,
        headroom_fraction=headroom_fraction,
        budget_bytes=budget,
        size=size,
        sizes=tuple(sizes),
        presets=tuple(p for p, _ in plans),
        unmeasured=tuple(sorted(set(PRESETS) - set(by_preset))),
        known_models=tuple(sorted({m.model for m in every}, key=str.casefold)),
        sources=tuple(sorted({m.source for m in rows})),
        rows=len(rows),
        measured_rows=sum(1 for m in rows if m.source.startswith("measured:")),
        device=device,
        devices=tuple(sorted({m.device for m in every_device}, key=str.casefold)),
    )


def format_memory(n: int) -> str:
    """Binary units, as the GPU tools print them."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB"


def _origin(source: str) -> str:
    # A published row's URL, or the command of a measured one: what a footnote points to.
    kind, _, rest = source.partition(":")
    rest = rest.strip()
    if kind == "published":
        return rest.split()[0]
    return f"measured: {rest}"


def _format_size(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def format_plan(report: PlanReport) -> str:
    """The plan as a small table for the terminal, with the sources as numbered footnotes."""
    head = (
        f"{report.model} on {format_memory(report.gpu_memory_bytes)}: presets must peak at "
        f"{format_memory(report.budget_bytes)} or less "
        f"({report.headroom_fraction:.0%} kept for the CUDA context and fragmentation)."
    )
    if report.device is not None and report.devices and not report.sizes:
        devices = "; ".join(report.devices)
        return (
            f"{head}\nNo figures for {report.model!r} on a device named like "
            f"{report.device!r}. Devices in the table for it: {devices}."
        )
    if not report.sizes or report.size is None:  # no row for the model (then no size)
        known = ", ".join(report.known_models) or "none"
        return f"{head}\nNo figures for {report.model!r}. Models in the table: {known}."
    if not report.presets:
        sizes = ", ".join(_format_size(size) for size in report.sizes)
        return (
            f"{head}\nNo figures for {report.model!r} at {_format_size(report.size)}. "
            f"Sizes in the table for it: {sizes}."
        )
    on = f" on {report.device!r} only" if report.device is not None else ""
    head += f"\nFigures at {_format_size(report.size)}{on}"
    others = [size for size in report.sizes if size != report.size]
    if others:
        head += f" (also measured: {', '.join(_format_size(s) for s in others)}; --size to choose)"
    head += "."

    origins: list[str] = []

    def refs(plan: PresetPlan) -> str:
        numbers = []
        for m in (plan.memory, plan.largest_batch, plan.fastest):
            if m is None:
                continue
            origin = _origin(m.source)
            if origin not in origins:
                origins.append(origin)
            numbers.append(origins.index(origin) + 1)
        return ",".join(str(n) for n in sorted(set(numbers)))

    header = (
        "preset",
        "fits",
        "peak (batch 1)",
        "largest batch",
        "s/image (batch 1)",
        "on",
        "at",
        "src",
    )
    table: list[tuple[str, ...]] = [header]
    for p in report.presets:
        if p.peak_memory_bytes is not None:
            peak = format_memory(p.peak_memory_bytes)
        elif p.memory is not None and p.memory.peak_memory_bytes is not None:
            peak = f"? ({format_memory(p.memory.peak_memory_bytes)} at {p.memory.batch})"
        else:
            peak = "?"
        largest = (
            f"{p.largest_batch.batch} ({p.largest_batch.images_per_second:.2f} img/s, "
            f"{p.largest_batch.steps} steps)"
            if p.largest_batch
            else "-"
        )
        fastest = p.fastest
        table.append(
            (
                p.preset,
                {Fit.FITS: "yes", Fit.TOO_BIG: "no", Fit.UNKNOWN: "?"}[p.fit],
                peak,
                largest,
                f"{fastest.seconds_per_image:.2f}" if fastest else "-",
                fastest.device if fastest else "-",
                f"{fastest.width}x{fastest.height}, {fastest.steps} steps" if fastest else "-",
                refs(p),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [head, ""]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    if report.unmeasured:
        lines.append(f"No figures yet: {', '.join(report.unmeasured)}.")
    published = report.rows - report.measured_rows
    lines += [
        "",
        f"From {report.rows} rows of the measurement table ({published} published, "
        f"{report.measured_rows} measured on our machines). Peak = "
        "torch.cuda.max_memory_allocated; '?' = not measured at batch 1, never counted as "
        "fitting. Times are from the devices shown, not this GPU.",
    ]
    lines += [f"[{i}] {origin}" for i, origin in enumerate(origins, start=1)]
    return "\n".join(lines)
