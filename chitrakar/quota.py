"""Quota rules: what a job costs, which accounts pay, and when a quota day begins. Plain
Python, no I/O; the ledger (db.ledger) records the credits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from chitrakar.domain import CommandError, GenerationPlan, JobKind

# Steps above this cost double: they take about twice the GPU time of a default image.
STEPS_INCLUDED = 30


def job_cost(kind: JobKind, plan: GenerationPlan, base_size: int) -> int:
    """Credits a job costs: one per image of the deployment's size and up to 30 steps, more
    for larger or longer images. An upscale costs one (it is a single image, however tiled);
    style previews are the service's own and cost nothing."""
    if kind == JobKind.PREVIEWS:
        return 0
    if kind == JobKind.UPSCALE:
        return 1
    area = math.ceil(plan.width * plan.height / (base_size * base_size) - 0.2)
    steps = 2 if plan.steps > STEPS_INCLUDED else 1
    return len(plan.seeds) * max(1, area) * steps


USER_ACCOUNT_PREFIX = "user:"


def user_account(channel: str, external_id: str) -> str:
    return f"{USER_ACCOUNT_PREFIX}{channel}:{external_id}"


def group_account(channel: str, chat_id: int) -> str:
    return f"group:{channel}:{chat_id}"


@dataclass(frozen=True)
class Account:
    """Who pays: a key and its daily limit (None: no limit, nothing is charged to it)."""

    key: str
    daily_limit: int | None


def quota_day(now: datetime, zone: ZoneInfo) -> date:
    """The quota day a moment falls in, in the deployment's time zone."""
    return now.astimezone(zone).date()


def next_reset(now: datetime, zone: ZoneInfo) -> datetime:
    """When the next quota day begins (local midnight), as an aware datetime."""
    tomorrow = quota_day(now, zone) + timedelta(days=1)
    return datetime.combine(tomorrow, time(0), tzinfo=zone)


class QuotaExceeded(CommandError):
    """A request that costs more than an account has left today."""


def exceeded(account_key: str, cost: int, left: int) -> QuotaExceeded:
    """The refusal for an account short of credits, saying whose credits ran out."""
    key = "quota.exceeded_group" if account_key.startswith("group:") else "quota.exceeded"
    return QuotaExceeded(key, cost=cost, left=max(left, 0))
