"""Quota rules: costs and quota days."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from chitrakar.domain import GenerationPlan, JobKind
from chitrakar.quota import job_cost, next_reset, quota_day


def plan(images: int = 1, size: tuple[int, int] = (512, 512), steps: int = 25) -> GenerationPlan:
    return GenerationPlan("p", size[0], size[1], steps, tuple(range(images)), 7.0)


@pytest.mark.parametrize(
    ("kind", "the_plan", "cost"),
    [
        (JobKind.PORTRAIT, plan(), 1),
        (JobKind.PORTRAIT, plan(images=3), 3),
        (JobKind.AVATAR, plan(images=4, steps=30), 4),  # an avatar album of 4 costs 4
        (JobKind.PORTRAIT, plan(steps=31), 2),  # long runs cost double
        (JobKind.PORTRAIT, plan(size=(680, 384)), 1),  # other ratios keep the area
        (JobKind.PORTRAIT, plan(size=(1024, 1024)), 4),
        (JobKind.VARIATION, plan(images=2), 2),
        (JobKind.UPSCALE, plan(size=(1024, 1024), steps=40), 1),  # an upscale costs 1
        (JobKind.PREVIEWS, plan(images=4), 0),
    ],
)
def test_costs(kind: JobKind, the_plan: GenerationPlan, cost: int) -> None:
    assert job_cost(kind, the_plan, 512) == cost


def test_the_quota_day_turns_at_local_midnight() -> None:
    kolkata = ZoneInfo("Asia/Kolkata")
    # 19:00 UTC is 00:30 the next day in India.
    late = datetime(2026, 11, 26, 19, 0, tzinfo=UTC)
    assert quota_day(late, ZoneInfo("UTC")).day == 26
    assert quota_day(late, kolkata).day == 27
    reset = next_reset(late, kolkata)
    assert (reset.day, reset.hour, reset.minute) == (28, 0, 0)
    assert reset.astimezone(UTC) == datetime(2026, 11, 27, 18, 30, tzinfo=UTC)


def test_an_unknown_time_zone_is_refused_at_start() -> None:
    from pydantic import ValidationError

    from chitrakar.config import Settings

    with pytest.raises(ValidationError, match="Asia/Kolkata"):
        Settings(timezone="India/Delhi")


def test_an_image_size_the_vae_cannot_make_is_refused_at_start() -> None:
    """An upscale's tiles are image_size pixels; a pipeline makes 496 of 500, and stitching
    the tiles failed on every upscale."""
    from pydantic import ValidationError

    from chitrakar.config import Settings

    with pytest.raises(ValidationError, match="multiple of 8"):
        Settings(image_size=500)
    assert Settings(image_size=504).image_size == 504
