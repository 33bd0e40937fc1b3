"""Cost per 1,000 images: the hourly arithmetic, the break-even and the plot."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from chitrakar.tco import (
    HOURS_PER_MONTH,
    CostInputs,
    break_even_utilisation,
    cost_curve,
    cost_report,
    format_percent,
    format_report,
    plot_tco,
)

# An H100 bought for 30,000 and written off over 36 months, 700 W at 8 a kWh, 0.5 images/s,
# busy 60 % of the hours; the API charges 0.04 an image. One currency throughout (INR here).
OWNED = CostInputs(
    images_per_second=0.5,
    hardware_price=30_000,
    amortisation_months=36,
    power_watts=700,
    electricity_price_per_kwh=8,
    utilisation=0.6,
    api_price_per_image=0.04,
    currency="INR",
)

# A rented GPU at 2.50 an hour, 700 W busy and 100 W idle at 0.15 a kWh, 730 a month for hosting,
# 0.5 images/s, busy 25 %; the API charges 0.01 an image.
RENTED = CostInputs(
    images_per_second=0.5,
    hourly_rent=2.5,
    power_watts=700,
    idle_watts=100,
    electricity_price_per_kwh=0.15,
    other_monthly=730,
    utilisation=0.25,
    api_price_per_image=0.01,
)


def test_owned_hardware_worked_by_hand() -> None:
    r = cost_report(OWNED)
    # hardware: 30,000 / (36 months x 730 h) = 30,000 / 26,280 = 1.141553 an hour
    assert r.hardware_per_hour == pytest.approx(1.141553, rel=1e-6)
    # energy: (700 W x 0.6 + 0 W x 0.4) / 1000 = 0.42 kW, x 8 = 3.36 an hour
    assert r.energy_per_hour == pytest.approx(3.36)
    assert r.other_per_hour == 0
    # total: 1.141553 + 3.36 = 4.501553 an hour
    assert r.cost_per_hour == pytest.approx(4.501553, rel=1e-6)
    # images: 0.5 /s x 3600 s x 0.6 = 1,080 an hour; x 730 h = 788,400 a month
    assert r.images_per_hour == pytest.approx(1080)
    assert r.images_per_month == pytest.approx(788_400)
    # per 1,000 images: 4.501553 / 1,080 x 1000 = 4.168104
    assert r.cost_per_1000 == pytest.approx(4.168104, rel=1e-6)
    # API: 0.04 x 1000 = 40 per 1,000
    assert r.api_cost_per_1000 == pytest.approx(40)
    # break-even: fixed A = 1.141553 (hardware, no other, no idle); B = 0.7 kW x 8 = 5.6;
    # R = 0.5 x 3600 = 1,800 images an hour at full load; R x a = 1,800 x 0.04 = 72.
    # u* = A / (R a - B) = 1.141553 / 66.4 = 0.0171921
    assert r.break_even_utilisation == pytest.approx(0.0171921, rel=1e-5)
    # images a month there: 1,800 x 0.0171921 x 730 = 22,590.4
    assert r.break_even_images_per_month == pytest.approx(22_590.4, rel=1e-5)
    assert r.owned and r.cheaper_than_api


def test_rented_hardware_with_idle_power_and_other_costs_worked_by_hand() -> None:
    r = cost_report(RENTED)
    assert r.hardware_per_hour == 2.5
    # energy: (700 x 0.25 + 100 x 0.75) / 1000 = (175 + 75) / 1000 = 0.25 kW, x 0.15 = 0.0375
    assert r.energy_per_hour == pytest.approx(0.0375)
    # other: 730 a month / 730 h = 1.00 an hour
    assert r.other_per_hour == pytest.approx(1.0)
    # total 2.5 + 0.0375 + 1.0 = 3.5375; images 0.5 x 3600 x 0.25 = 450 an hour
    assert r.cost_per_hour == pytest.approx(3.5375)
    assert r.images_per_hour == pytest.approx(450)
    # 3.5375 / 450 x 1000 = 7.861111 per 1,000, against the API's 10
    assert r.cost_per_1000 == pytest.approx(7.861111, rel=1e-6)
    # A = 2.5 + 1.0 + 0.1 kW x 0.15 = 3.515; B = (0.7 - 0.1) x 0.15 = 0.09; R a = 1,800 x 0.01
    # = 18; u* = 3.515 / (18 - 0.09) = 3.515 / 17.91 = 0.196259
    assert r.break_even_utilisation == pytest.approx(0.196259, rel=1e-5)
    assert not r.owned and r.cheaper_than_api


@pytest.mark.parametrize("inputs", [OWNED, RENTED], ids=["owned", "rented"])
def test_the_break_even_plugged_back_in_costs_what_the_api_does(inputs: CostInputs) -> None:
    u = break_even_utilisation(inputs)
    assert u is not None and 0 < u <= 1
    api = cost_report(inputs).api_cost_per_1000
    assert cost_report(replace(inputs, utilisation=u)).cost_per_1000 == pytest.approx(api)
    # Busier is cheaper than the API, idler is dearer.
    assert cost_report(replace(inputs, utilisation=min(1, u * 1.1))).cheaper_than_api
    assert not cost_report(replace(inputs, utilisation=u * 0.9)).cheaper_than_api


def test_no_break_even_when_the_api_is_always_cheaper() -> None:
    # u* = 3.515 / (1,800 x 0.002 - 0.09) = 3.515 / 3.51 > 1: not even a fully busy GPU wins.
    cheap_api = replace(RENTED, api_price_per_image=0.002)
    assert break_even_utilisation(cheap_api) is None
    # Energy alone (B = 0.7 kW x 100 = 70 an hour) costs more than 1,800 images x 0.01 = 18.
    dear_power = replace(RENTED, idle_watts=0, electricity_price_per_kwh=100)
    assert break_even_utilisation(dear_power) is None
    r = cost_report(cheap_api)
    assert r.break_even_utilisation is None and r.break_even_images_per_month is None
    assert "break-even: none" in format_report(r)
    assert "dearer than the API" in format_report(r)


def test_without_an_api_price_there_is_no_comparison() -> None:
    r = cost_report(replace(OWNED, api_price_per_image=None))
    assert r.api_cost_per_1000 is None and r.break_even_utilisation is None
    assert r.cheaper_than_api is None
    assert "API" not in format_report(r)


@pytest.mark.parametrize(
    "changes",
    [
        {"hardware_price": None, "amortisation_months": None},  # neither
        {"hourly_rent": 2.0},  # both
        {"amortisation_months": None},  # owned, half given
        {"hardware_price": None},  # owned, half given
    ],
)
def test_exactly_one_of_owned_or_rented(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"owned|rented"):
        replace(OWNED, **changes)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("utilisation", 0),
        ("utilisation", 1.01),
        ("utilisation", float("nan")),
        ("images_per_second", 0),
        ("hardware_price", -1),
        ("amortisation_months", 0),
        ("power_watts", -700),
        ("idle_watts", -1),
        ("electricity_price_per_kwh", float("inf")),
        ("other_monthly", -5),
        ("api_price_per_image", 0),
        ("currency", " "),
    ],
)
def test_inputs_out_of_range_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        replace(OWNED, **{field: value})


def test_idle_power_above_the_power_at_load_is_refused() -> None:
    with pytest.raises(ValueError, match=r"idle_watts \(800\) must not exceed power_watts"):
        replace(RENTED, idle_watts=800)
    assert cost_report(replace(RENTED, idle_watts=700)).energy_per_hour == pytest.approx(0.105)


@pytest.mark.parametrize(
    ("changes", "figure"),
    [
        ({"images_per_second": 1e308}, "images per hour comes out at inf"),
        ({"images_per_second": 1e-300}, "cost per 1,000 images comes out at"),
        ({"amortisation_months": 1e-300}, "hardware per hour comes out at"),
        ({"hardware_price": 1e300}, "hardware per hour comes out at"),
        ({"api_price_per_image": 1e300}, "API per 1,000 images comes out at"),
    ],
)
def test_inputs_in_range_one_by_one_but_not_together_are_refused(
    changes: dict[str, Any], figure: str
) -> None:
    # Each input is a positive finite number; what they make is not a cost anyone has.
    with pytest.raises(ValueError, match=figure):
        cost_report(replace(OWNED, **changes))


def test_a_fully_busy_gpu_and_free_power_are_allowed() -> None:
    r = cost_report(replace(OWNED, utilisation=1, electricity_price_per_kwh=0))
    # 1.141553 an hour / 1,800 images x 1000 = 0.634196
    assert r.cost_per_1000 == pytest.approx(0.634196, rel=1e-6)


def test_the_cost_curve_runs_from_two_percent_to_full_load() -> None:
    curve = cost_curve(OWNED)
    assert len(curve) == 50
    assert curve[0][0] == pytest.approx(0.02) and curve[-1][0] == 1.0
    costs = [cost for _, cost in curve]
    assert costs == sorted(costs, reverse=True)  # busier is cheaper per image
    u, cost = curve[29]
    assert cost == pytest.approx(cost_report(replace(OWNED, utilisation=u)).cost_per_1000)
    assert len(cost_curve(OWNED, points=2)) == 2
    with pytest.raises(ValueError, match="points"):
        cost_curve(OWNED, points=1)


@pytest.mark.parametrize("inputs", [OWNED, RENTED], ids=["linear-y", "log-y"])
def test_the_plot_is_a_png_of_the_promised_size(inputs: CostInputs, tmp_path: Path) -> None:
    # OWNED's curve spans about 35 to 3.7 (under 20x: linear); RENTED's about 96 to 2 (log).
    out = plot_tco(inputs, tmp_path / "tco.png")
    assert out == tmp_path / "tco.png"
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (800, 500)
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    # A curve, a level line, markers and text: far more than a background and one ink.
    assert colours is not None and len(colours) > 2


def test_the_terminal_report_carries_the_figures() -> None:
    text = format_report(cost_report(OWNED))
    assert "in INR" in text
    assert f"a month = {HOURS_PER_MONTH} h" in text
    assert "1.1416  30,000.00 over 36 months" in text
    assert "3.3600  700 W busy 60%, 0 W idle, 8 per kWh" in text
    assert "1,080 images an hour, 788,400 a month" in text
    assert "cost per 1,000 images: 4.17 INR" in text
    assert "API per 1,000 images:  40.00 INR" in text
    assert "break-even: 1.7% utilisation (22,590 images a month)" in text
    assert "at 60%, self-hosting is cheaper than the API." in text


@pytest.mark.parametrize(
    ("share", "decimals", "text"),
    [
        (0.6, 0, "60%"),
        (1.0, 0, "100%"),
        (0.25, 0, "25%"),
        (0.005, 0, "0.5%"),
        (0.025, 0, "2.5%"),
        (0.0123, 0, "1.2%"),
        (0.00042, 0, "0.042%"),
        (0.0172, 1, "1.7%"),
        (0.6, 1, "60.0%"),
        (0.0004, 1, "0.04%"),
    ],
)
def test_a_percentage_keeps_enough_digits(share: float, decimals: int, text: str) -> None:
    assert format_percent(share, decimals) == text


def test_a_small_utilisation_is_not_printed_as_zero() -> None:
    # Busy half a percent of the hours: about 7 minutes a day.
    text = format_report(cost_report(replace(OWNED, utilisation=0.005)))
    assert "Self-hosting at 0.5% utilisation" in text
    assert "700 W busy 0.5%, 0 W idle" in text
    assert "at 0.5%, self-hosting is dearer than the API." in text
    assert "0%" not in text.replace("0.5%", "").replace("100%", "")
    cheap = replace(OWNED, hardware_price=30, api_price_per_image=0.04)
    # 30 over 36 months against 0.04 an image: even at 0.0017% the GPU pays (it was 0.0%).
    assert "break-even: 0.0017% utilisation" in format_report(cost_report(cheap))
