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
from dataclasses import asdict, dataclass, fields, replace
from decimal import ROUND_FLOOR, Decimal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from chitrakar.presets import Preset

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
        if (problem := preset_name_problem(self.preset)) is not None:
            raise ValueError(problem)
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


def preset_name_problem(name: object) -> str | None:
    """Why a row cannot name this preset (None when it can): a table's preset names are
    lower-case words joined by '-', as the built-in ones are."""
    if not isinstance(name, str) or not _PRESET_NAME.fullmatch(name):
        return f"preset {name!r} must be lower-case words joined by '-'"
    return None


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
    # 23.65GiB is a fraction of a byte over a whole number: the fraction is dropped.
    whole = int(amount.to_integral_value(rounding=ROUND_FLOOR))
    if whole == 0:
        raise ValueError(f"{text!r} is less than one byte")
    return whole


_CAPABILITY = re.compile(r"(\d{1,2})(?:\.(\d))?")


def parse_capability(text: str) -> tuple[int, int]:
    """A CUDA compute capability as nvidia-smi and NVIDIA's tables write it: "7.5" (Turing),
    "8.6", "8.9" (Ada), "9.0" (Hopper); "8" is 8.0."""
    match = _CAPABILITY.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(
            f"cannot read {text!r} as a compute capability: write e.g. 7.5, 8.6 or 9.0"
        )
    return int(match.group(1)), int(match.group(2) or 0)


def settings_match(m: Measurement) -> bool | None:
    """Whether the row was measured with its preset's own settings: True for our measurements
    (`chitrakar bench` runs the preset itself) and for a published row that says "Preset
    'NAME'"; False for one that says "Nearest preset 'NAME'" (measured with other settings,
    such as without fused QKV); None where the source says neither."""
    if m.source.startswith("measured:"):
        return True
    if f"Nearest preset '{m.preset}'" in m.source:
        return False
    if f"Preset '{m.preset}'" in m.source:
        return True
    return None


class Fit(StrEnum):
    """Whether a preset fits in the memory budget."""

    FITS = "fits"
    TOO_BIG = "too big"
    UNKNOWN = "memory unknown"
    # The GPU's compute capability is too old for what the preset needs (bfloat16, float8).
    CANNOT_RUN = "cannot run"


@dataclass(frozen=True)
class PresetPlan:
    """What the table says about one preset of one model.

    At each batch size the rows measured with the preset's own settings decide where the table
    says which (`settings_match`); of those (or of all, where none is), the highest peak counts:
    a plan errs on the side of not fitting. `memory` is the row the fit was judged on: that row
    at batch 1; where batch 1 was never measured, the smallest fitting batch's (memory grows
    with the batch, so batch 1 fits too) or, when none fits, the smallest batch's (then `fit`
    is UNKNOWN). `largest_batch` is the largest measured batch that fits. `fastest` is the
    batch-1 speed: the `memory` row's own where that is at batch 1, so that the peak and the
    speed shown are one measurement; otherwise the best seconds per image at batch 1.

    `cannot_run` gives the reasons a GPU of the plan's compute capability cannot run the preset
    (with `fit` CANNOT_RUN). `memory_from` names the presets whose rows the memory was judged
    on when they are not the preset's own: an "auto" preset runs in float16 below compute
    capability 8.0, and its own rows were measured in bfloat16.
    """

    preset: str
    fit: Fit
    memory: Measurement | None
    largest_batch: Measurement | None
    fastest: Measurement | None
    cannot_run: tuple[str, ...] = ()
    memory_from: tuple[str, ...] = ()

    @property
    def peak_memory_bytes(self) -> int | None:
        """The measured peak at batch 1 the fit was judged on, None where batch 1 was not
        measured."""
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
    the model's devices in the table. `capability` is the GPU's compute capability the presets
    were checked against, None where none was given (nothing checked); `unchecked` the presets
    with rows that the presets given to `plan` do not define (so could not be checked)."""

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
    capability: tuple[int, int] | None = None
    unchecked: tuple[str, ...] = ()

    @property
    def fitting(self) -> tuple[PresetPlan, ...]:
        return tuple(p for p in self.presets if p.fit is Fit.FITS)

    @property
    def too_big(self) -> tuple[PresetPlan, ...]:
        return tuple(p for p in self.presets if p.fit is Fit.TOO_BIG)

    @property
    def memory_unknown(self) -> tuple[PresetPlan, ...]:
        return tuple(p for p in self.presets if p.fit is Fit.UNKNOWN)

    @property
    def cannot_run(self) -> tuple[PresetPlan, ...]:
        return tuple(p for p in self.presets if p.fit is Fit.CANNOT_RUN)


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


def _peak(m: Measurement) -> int:
    return m.peak_memory_bytes or 0


def _decisive(rows: Sequence[Measurement]) -> list[Measurement]:
    """The rows measured with the preset's own settings, where the table says which; else all."""
    exact = [m for m in rows if settings_match(m) is True]
    return exact or list(rows)


def _plan_preset(
    preset: str,
    rows: Sequence[Measurement],
    budget: int,
    memory_rows: Sequence[Measurement] | None = None,
) -> PresetPlan:
    """`rows` are the preset's; `memory_rows`, where given, are the rows its memory is judged
    on instead (see `PresetPlan.memory_from`)."""
    with_memory = [
        m for m in (rows if memory_rows is None else memory_rows) if m.peak_memory_bytes is not None
    ]
    # One row a batch size: the highest peak of the rows that decide (see PresetPlan).
    by_batch = {
        batch: min(
            _decisive([m for m in with_memory if m.batch == batch]),
            key=lambda m: (-_peak(m), m.seconds_per_image, _tiebreak(m)),
        )
        for batch in sorted({m.batch for m in with_memory})
    }
    fitting = [m for m in by_batch.values() if _peak(m) <= budget]  # smallest batch first
    memory: Measurement | None
    if 1 in by_batch:
        memory = by_batch[1]
        fit = Fit.FITS if _peak(memory) <= budget else Fit.TOO_BIG
    elif fitting:
        memory, fit = fitting[0], Fit.FITS
    elif by_batch:
        memory, fit = next(iter(by_batch.values())), Fit.UNKNOWN
    else:
        memory, fit = None, Fit.UNKNOWN
    largest = fitting[-1] if fitting else None
    fastest: Measurement | None
    if memory is not None and memory.batch == 1 and memory_rows is None:
        fastest = memory
    else:
        batch_one = _decisive([m for m in rows if m.batch == 1])
        fastest = (
            min(batch_one, key=lambda m: (m.seconds_per_image, _tiebreak(m))) if batch_one else None
        )
    return PresetPlan(preset, fit, memory, largest, fastest)


def _speed(plan: PresetPlan, rows: Sequence[Measurement]) -> float:
    # Batch 1 where measured; otherwise the best the preset did at any batch.
    if plan.fastest is not None:
        return plan.fastest.seconds_per_image
    return min(m.seconds_per_image for m in rows)


_FIT_ORDER = {Fit.FITS: 0, Fit.TOO_BIG: 1, Fit.UNKNOWN: 2, Fit.CANNOT_RUN: 3}
# What a preset changes about the memory a pipeline holds (not its steps or scheduler): an
# "auto" preset's float16 twins are the float16 presets alike in these.
_MEMORY_SETTINGS = (
    "attention",
    "fuse_qkv",
    "channels_last",
    "compile",
    "quantize",
    "vae_slicing",
    "vae_tiling",
    "offload",
)


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
    batch: int = 1,
) -> Measurement:
    """The fastest row (images a second) for `model` under `preset` at `batch` images a call,
    on `device` (see `measured_on`) and at `size` where given; rows measured with the preset's
    own settings first (see `settings_match`). Batch 1 by default: a GPU that is seldom busy
    runs lone jobs, and the best batch's throughput would price them too cheaply. The rows must
    come from one device: a cost is for one GPU, and the same preset ran 0.39 images a second
    on an A100 and 0.005 on a CPU. Raises ValueError, naming the devices to choose from, when
    they do not, and the batch sizes measured when `batch` was not."""
    if not _positive_int(batch):
        raise ValueError(f"the batch size must be a whole number of at least 1, not {batch!r}")
    device = _device_wanted(device)
    wanted = model.strip().casefold()
    every_batch = [
        m
        for m in measurements
        if m.model.casefold() == wanted
        and m.preset == preset
        and measured_on(m, device)
        and (size is None or _size_of(m) == size)
    ]
    at = f" at {_format_size(size)}" if size is not None else ""
    on = f" on a device named like {device!r}" if device is not None else ""
    if not every_batch:
        raise ValueError(f"no measurement of {model} with preset {preset}{at}{on} found")
    # At any batch size: a device measured only at another one is still a device to choose.
    devices = sorted({m.device for m in every_batch})
    if len(devices) > 1:
        raise ValueError(
            f"{model} with preset {preset}{at} was measured on {len(devices)} devices "
            f"({'; '.join(devices)}): choose the one the prices are for with --device, "
            "e.g. --device '" + devices[-1] + "'"
        )
    rows = [m for m in every_batch if m.batch == batch]
    if not rows:
        batches = ", ".join(str(b) for b in sorted({m.batch for m in every_batch}))
        raise ValueError(
            f"no measurement of {model} with preset {preset}{at}{on} at batch {batch}; "
            f"measured at batch {batches}"
        )
    return max(_decisive(rows), key=lambda m: (m.images_per_second, _tiebreak(m)))


def plan(
    measurements: Iterable[Measurement],
    model: str,
    gpu_memory_bytes: int,
    headroom_fraction: float = 0.1,
    size: Size | None = None,
    device: str | None = None,
    capability: tuple[int, int] | None = None,
    presets: Mapping[str, Preset] | None = None,
) -> PlanReport:
    """Which of the model's presets fit `gpu_memory_bytes`, keeping `headroom_fraction` of it
    for the CUDA context and fragmentation (a preset fits when its peak <= memory x (1 - h)).
    Only rows at one image size count (memory and time grow with the pixels): `size`, or the
    size the model was measured at most. With `device`, only rows measured on a device of
    that name (see `measured_on`): `gpu` took 3.15 s an image on the H100 measured here and
    1.87 s on the H200.
    With `capability` (a CUDA compute capability, such as (7, 5)) and `presets` (the catalogue's
    presets by name; needed with it), a preset that GPU cannot run is CANNOT_RUN, never
    fitting, and below 8.0 an "auto" preset (float16 there) is judged on its float16 twins'
    rows where the table has them (see `PresetPlan.memory_from`).
    The model label is matched case-insensitively."""
    budget = budget_bytes(gpu_memory_bytes, headroom_fraction)
    if capability is not None and presets is None:
        raise ValueError("checking a compute capability needs the presets")
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
    plans: list[tuple[PresetPlan, list[Measurement]]] = []
    unchecked: list[str] = []
    for name, own in by_preset.items():
        if capability is None or presets is None:
            plans.append((_plan_preset(name, own, budget), own))
        elif name not in presets:
            unchecked.append(name)
            plans.append((_plan_preset(name, own, budget), own))
        else:
            checked = _checked_plan(name, own, rows, budget, capability, presets)
            plans.append((checked, own))
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
        capability=capability,
        unchecked=tuple(sorted(unchecked)),
    )


def _checked_plan(
    name: str,
    own: Sequence[Measurement],
    rows: Sequence[Measurement],
    budget: int,
    capability: tuple[int, int],
    presets: Mapping[str, Preset],
) -> PresetPlan:
    """A preset's plan on a CUDA GPU of this compute capability (see `plan`)."""
    from chitrakar.presets import DeviceFacts, resolved_dtype, unmet_needs

    preset = presets[name]
    facts = DeviceFacts("cuda", capability)
    memory_rows: list[Measurement] | None = None
    memory_from: tuple[str, ...] = ()
    if preset.dtype == "auto" and resolved_dtype(preset, facts) == "float16":
        twins = {
            twin
            for twin, other in presets.items()
            if other.dtype == "float16"
            and all(getattr(other, f) == getattr(preset, f) for f in _MEMORY_SETTINGS)
        }
        twin_rows = [m for m in rows if m.preset in twins and m.peak_memory_bytes is not None]
        if twin_rows:
            memory_rows = twin_rows
            memory_from = tuple(sorted({m.preset for m in twin_rows}))
    planned = _plan_preset(name, own, budget, memory_rows)
    reasons = tuple(unmet_needs(preset, facts))
    fit = Fit.CANNOT_RUN if reasons else planned.fit
    return replace(planned, fit=fit, cannot_run=reasons, memory_from=memory_from)


def format_capability(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


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
            if p.memory_from:
                peak += f" ({', '.join(p.memory_from)})"
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
                {
                    Fit.FITS: "yes",
                    Fit.TOO_BIG: "no",
                    Fit.UNKNOWN: "?",
                    Fit.CANNOT_RUN: "cannot run",
                }[p.fit],
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
    lines += _capability_notes(report)
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


def _capability_notes(report: PlanReport) -> list[str]:
    """What the plan says about the GPU's compute capability, under the table."""
    if report.capability is None:
        return [
            "Compute capability not checked: give --capability (e.g. 7.5 for a Turing card) to "
            "mark the presets the GPU cannot run (bfloat16 needs 8.0, float8 8.9) and to judge "
            "'auto' presets in float16 below 8.0."
        ]
    at = format_capability(report.capability)
    lines = [f"Checked against compute capability {at}."]
    by_reasons: dict[tuple[str, ...], list[str]] = {}
    for p in report.cannot_run:
        by_reasons.setdefault(p.cannot_run, []).append(p.preset)
    for reasons, names in by_reasons.items():
        lines.append(f"Cannot run at {at} ({'; '.join(reasons)}): {', '.join(names)}.")
    twinned = [p for p in report.presets if p.memory_from]
    if twinned:
        twins = ", ".join(p.preset for p in twinned)
        lines.append(
            f"At {at} 'auto' presets run in float16: the peaks of {twins} are their float16 "
            "twins' (named beside the peak)."
        )
    if report.unchecked:
        lines.append(f"Not among the presets, so not checked: {', '.join(report.unchecked)}.")
    return lines
