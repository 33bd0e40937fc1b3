"""What 1,000 images cost on our own GPU, against a cloud API's price per image.

The arithmetic, with a month of 730 hours (8,760 / 12) and u the utilisation, the share of
hours the GPU is generating:

    hardware per hour = price / (amortisation months x 730)       (owned)
                      = hourly rent                                (rented)
    energy per hour   = (load W x u + idle W x (1 - u)) / 1000 x price per kWh
    other per hour    = other monthly / 730
    images per hour   = images per second x 3600 x u
    cost per 1,000    = (hardware + energy + other) per hour / images per hour x 1000
    API per 1,000     = API price per image x 1000

Writing the hourly cost as A + B x u, with A = hardware + other + idle kW x kWh price and
B = (load kW - idle kW) x kWh price, and R = images per second x 3600, the cost per image is
A / (R u) + B / R. It falls as u grows, and equals the API's price a at the break-even

    u* = A / (R a - B),

self-hosting being cheaper above it. There is none in (0, 1] when R a <= B (energy alone costs
more than the API) or u* > 1 (the GPU cannot be busy enough).

Only `plot_tco` writes a file; it loads matplotlib when called, so nothing else pays for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

HOURS_PER_MONTH = 730
SECONDS_PER_HOUR = 3600
# The utilisation a cost curve starts at: at 0 no image is made and the cost per image is
# infinite.
CURVE_START = 0.02


@dataclass(frozen=True)
class CostInputs:
    """What the cost of self-hosting depends on. Give either `hardware_price` with
    `amortisation_months` (owned) or `hourly_rent` (rented), not both. Every price is in
    `currency`. `power_watts` is the whole server at load; `idle_watts` while it waits."""

    images_per_second: float
    power_watts: float
    electricity_price_per_kwh: float
    utilisation: float
    hardware_price: float | None = None
    amortisation_months: float | None = None
    hourly_rent: float | None = None
    idle_watts: float = 0.0
    other_monthly: float = 0.0
    api_price_per_image: float | None = None
    currency: str = "USD"

    def __post_init__(self) -> None:
        owned = self.hardware_price is not None or self.amortisation_months is not None
        rented = self.hourly_rent is not None
        if owned == rented:
            raise ValueError(
                "give either hardware_price and amortisation_months (owned) or hourly_rent "
                "(rented), exactly one of the two"
            )
        if owned and (self.hardware_price is None or self.amortisation_months is None):
            raise ValueError("owned hardware needs both hardware_price and amortisation_months")
        for name in ("images_per_second", "hardware_price", "amortisation_months", "hourly_rent"):
            value = getattr(self, name)
            if value is not None and not _finite(value, minimum_exclusive=0):
                raise ValueError(f"{name} must be a number above zero")
        if self.api_price_per_image is not None and not _finite(
            self.api_price_per_image, minimum_exclusive=0
        ):
            raise ValueError("api_price_per_image must be a number above zero")
        for name in ("power_watts", "idle_watts", "electricity_price_per_kwh", "other_monthly"):
            if not _finite(getattr(self, name), minimum_inclusive=0):
                raise ValueError(f"{name} must be a number, zero or more")
        if not _finite(self.utilisation, minimum_exclusive=0) or self.utilisation > 1:
            raise ValueError("utilisation must be above 0 and at most 1")
        if self.idle_watts > self.power_watts:
            raise ValueError(
                f"idle_watts ({self.idle_watts:g}) must not exceed power_watts at load "
                f"({self.power_watts:g})"
            )
        if not isinstance(self.currency, str) or not self.currency.strip():
            raise ValueError("currency must be a non-empty label")


def _finite(
    value: object,
    *,
    minimum_exclusive: float | None = None,
    minimum_inclusive: float | None = None,
) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    if minimum_exclusive is not None and value <= minimum_exclusive:
        return False
    return minimum_inclusive is None or value >= minimum_inclusive


@dataclass(frozen=True)
class CostReport:
    """Per-hour costs at the inputs' utilisation, and the comparison with the API (None where
    no API price was given, or no break-even exists in (0, 1])."""

    inputs: CostInputs
    owned: bool
    hardware_per_hour: float
    energy_per_hour: float
    other_per_hour: float
    cost_per_hour: float
    images_per_hour: float
    images_per_month: float
    cost_per_1000: float
    api_cost_per_1000: float | None
    break_even_utilisation: float | None
    break_even_images_per_month: float | None

    @property
    def cheaper_than_api(self) -> bool | None:
        """Whether self-hosting costs less per image than the API at this utilisation."""
        if self.api_cost_per_1000 is None:
            return None
        return self.cost_per_1000 < self.api_cost_per_1000


def _hardware_per_hour(inputs: CostInputs) -> float:
    if inputs.hourly_rent is not None:
        return inputs.hourly_rent
    assert inputs.hardware_price is not None and inputs.amortisation_months is not None
    return inputs.hardware_price / (inputs.amortisation_months * HOURS_PER_MONTH)


def break_even_utilisation(inputs: CostInputs) -> float | None:
    """The utilisation at which self-hosting costs what the API does (see the module's
    docstring), None without an API price or where there is none in (0, 1]."""
    if inputs.api_price_per_image is None:
        return None
    kwh_price = inputs.electricity_price_per_kwh
    fixed = (
        _hardware_per_hour(inputs)
        + inputs.other_monthly / HOURS_PER_MONTH
        + inputs.idle_watts / 1000 * kwh_price
    )
    per_utilisation = (inputs.power_watts - inputs.idle_watts) / 1000 * kwh_price
    api_per_hour_at_full_load = (
        inputs.images_per_second * SECONDS_PER_HOUR * inputs.api_price_per_image
    )
    margin = api_per_hour_at_full_load - per_utilisation
    if margin <= 0:
        return None
    u = fixed / margin
    return u if 0 < u <= 1 else None


def format_percent(share: float, decimals: int = 0) -> str:
    """A share as a percentage with at least `decimals` decimals, and more where fewer would
    show under two significant digits: 60%, 2.5%, 0.5%, 0.042% (never 0% for a share above
    zero)."""
    percent = share * 100
    for places in range(decimals, 7):
        text = f"{percent:.{places}f}"
        digits = text.replace(".", "").replace("-", "").lstrip("0")
        if len(digits) >= 2 or float(text) == percent:
            return f"{text}%"
    return f"{percent:.2g}%"


# Beyond this no figure is a cost or a rate anyone has: the inputs are mistyped (or overflow).
LARGEST_FIGURE = 1e15


def cost_report(inputs: CostInputs) -> CostReport:
    """The costs of `inputs`, following the arithmetic in the module's docstring. Raises
    ValueError when a figure comes out infinite or beyond `LARGEST_FIGURE`, each input being
    in range on its own (1e300 images a second, or a price amortised over 1e-300 months)."""
    u = inputs.utilisation
    hardware = _hardware_per_hour(inputs)
    energy = (
        (inputs.power_watts * u + inputs.idle_watts * (1 - u))
        / 1000
        * inputs.electricity_price_per_kwh
    )
    other = inputs.other_monthly / HOURS_PER_MONTH
    per_hour = hardware + energy + other
    images_per_hour = inputs.images_per_second * SECONDS_PER_HOUR * u
    api = None if inputs.api_price_per_image is None else inputs.api_price_per_image * 1000
    even = break_even_utilisation(inputs)
    figures = {
        "hardware per hour": hardware,
        "energy per hour": energy,
        "other costs per hour": other,
        "images per hour": images_per_hour,
        "cost per 1,000 images": per_hour / images_per_hour * 1000 if images_per_hour else math.inf,
        "API per 1,000 images": api or 0.0,
    }
    for name, value in figures.items():
        if not math.isfinite(value) or abs(value) > LARGEST_FIGURE:
            raise ValueError(f"{name} comes out at {value:.3g}: check the inputs' units")
    return CostReport(
        inputs=inputs,
        owned=inputs.hourly_rent is None,
        hardware_per_hour=hardware,
        energy_per_hour=energy,
        other_per_hour=other,
        cost_per_hour=per_hour,
        images_per_hour=images_per_hour,
        images_per_month=images_per_hour * HOURS_PER_MONTH,
        cost_per_1000=per_hour / images_per_hour * 1000,
        api_cost_per_1000=api,
        break_even_utilisation=even,
        break_even_images_per_month=(
            None
            if even is None
            else inputs.images_per_second * SECONDS_PER_HOUR * even * HOURS_PER_MONTH
        ),
    )


def cost_curve(inputs: CostInputs, points: int = 50) -> list[tuple[float, float]]:
    """(utilisation, cost per 1,000 images) at `points` evenly spaced utilisations from 0.02
    to 1, everything else as in `inputs`."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError("points must be an integer of at least 2")
    step = (1 - CURVE_START) / (points - 1)
    # The last point is exactly 1, not 0.02 + 49 steps with its rounding.
    utilisations = [CURVE_START + i * step for i in range(points - 1)] + [1.0]
    return [(u, cost_report(replace(inputs, utilisation=u)).cost_per_1000) for u in utilisations]


# A cost range wider than this is drawn on a log scale, where the flat tail stays readable.
LOG_SCALE_RATIO = 20
PLOT_SIZE_INCHES = (8.0, 5.0)
PLOT_DPI = 100


def plot_tco(inputs: CostInputs, path: Path) -> Path:
    """Draws the cost per 1,000 images against utilisation into a PNG at `path` (800 x 500
    pixels) and returns the path: the API's price as a level line, a marker at the inputs'
    utilisation and one at the break-even. Uses matplotlib's Agg canvas directly, so no GUI
    and no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    report = cost_report(inputs)
    curve = cost_curve(inputs)
    even = report.break_even_utilisation
    if even is not None and report.api_cost_per_1000 is not None and even < curve[0][0]:
        # Draw the curve down to a break-even below where the curve starts, to meet its marker.
        curve.insert(0, (even, report.api_cost_per_1000))
    xs = [u for u, _ in curve]
    ys = [cost for _, cost in curve]
    currency = inputs.currency

    figure = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(xs, ys, color="tab:blue", linewidth=2, label="self-hosted")
    shown = list(ys)
    if report.api_cost_per_1000 is not None:
        api = report.api_cost_per_1000
        shown.append(api)
        axes.axhline(
            api, color="tab:red", linestyle="--", label=f"API: {api:,.2f} {currency} per 1,000"
        )
    axes.plot(
        [inputs.utilisation],
        [report.cost_per_1000],
        marker="o",
        markersize=9,
        color="tab:green",
        linestyle="none",
        label=f"at {format_percent(inputs.utilisation)}: {report.cost_per_1000:,.2f} {currency}",
    )
    if even is not None and report.api_cost_per_1000 is not None:
        axes.plot(
            [even],
            [report.api_cost_per_1000],
            marker="D",
            markersize=8,
            color="tab:orange",
            linestyle="none",
            label=f"break-even at {format_percent(even, 1)}",
        )
    if max(shown) / min(shown) > LOG_SCALE_RATIO:
        axes.set_yscale("log")
    axes.set_xlim(0, 1)
    axes.xaxis.set_major_formatter(PercentFormatter(xmax=1))
    axes.set_xlabel("Utilisation (share of hours the GPU is generating)")
    axes.set_ylabel(f"Cost per 1,000 images ({currency})")
    axes.set_title("Self-hosted cost per 1,000 images against utilisation")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def format_report(report: CostReport) -> str:
    """The report for the terminal: the hourly breakdown, the cost per 1,000 images and how it
    compares with the API."""
    i = report.inputs
    c = i.currency
    u = i.utilisation
    if report.owned:
        hardware_note = f"{i.hardware_price:,.2f} over {i.amortisation_months:g} months"
        hardware_label = "hardware (amortised)"
    else:
        hardware_note = "rent"
        hardware_label = "hardware (rented)"
    rows = [
        (hardware_label, f"{report.hardware_per_hour:,.4f}", hardware_note),
        (
            "energy",
            f"{report.energy_per_hour:,.4f}",
            f"{i.power_watts:g} W busy {format_percent(u)}, {i.idle_watts:g} W idle, "
            f"{i.electricity_price_per_kwh:g} per kWh",
        ),
        ("other", f"{report.other_per_hour:,.4f}", f"{i.other_monthly:,.2f} a month"),
        ("total", f"{report.cost_per_hour:,.4f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    number = max(len(r[1]) for r in rows)
    lines = [
        f"Self-hosting at {format_percent(u)} utilisation, {i.images_per_second:g} images/s "
        "at full load "
        f"(a month = {HOURS_PER_MONTH} h), in {c}:",
        "",
        f"  {'per hour':<{width}}  {c}",
    ]
    lines += [
        f"  {label:<{width}}  {value:>{number}}  {note}".rstrip() for label, value, note in rows
    ]
    lines += [
        "",
        f"  {report.images_per_hour:,.0f} images an hour, {report.images_per_month:,.0f} a month",
        f"  cost per 1,000 images: {report.cost_per_1000:,.2f} {c}",
    ]
    if report.api_cost_per_1000 is not None:
        lines.append(f"  API per 1,000 images:  {report.api_cost_per_1000:,.2f} {c}")
        if report.break_even_utilisation is None:
            lines.append(
                "  break-even: none — self-hosting costs more than the API at every utilisation"
            )
        else:
            assert report.break_even_images_per_month is not None
            lines.append(
                f"  break-even: {format_percent(report.break_even_utilisation, 1)} utilisation "
                f"({report.break_even_images_per_month:,.0f} images a month); "
                "cheaper than the API above it"
            )
        if math.isclose(report.cost_per_1000, report.api_cost_per_1000, rel_tol=1e-9):
            verdict = "as dear as"
        else:
            verdict = "cheaper than" if report.cheaper_than_api else "dearer than"
        lines.append(f"  at {format_percent(u)}, self-hosting is {verdict} the API.")
    return "\n".join(lines)
