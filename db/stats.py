"""What the service did over a period, and what is waiting now: for the admins' /stats and
/queue. Read-only; nothing here commits.

Durations are fetched and their percentiles computed here (nearest rank): a day of jobs is a
few thousand rows at most, and SQLite has no percentile function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select

from chitrakar.domain import ACTIVE_STATUSES, JobStatus
from db.models import Job, User
from db.session import UnitOfWork

TOP_USERS = 5


def _as_utc(moment: datetime) -> datetime:
    # SQLite keeps no time zone: what it returns was written as UTC. A bound parameter is
    # turned to UTC too, as SQLite compares the text of the times.
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank percentile (0 < p <= 100) of the values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Stats:
    """The period from `since` to `now`, both included."""

    # Jobs created in the period, by status (every status present, 0 when none).
    jobs_by_status: dict[str, int]
    # Images delivered: the seeds of the jobs finished done in the period.
    images: int
    # The generation time of the jobs finished in the period (done or blocked alike).
    gpu_seconds: float
    # Jobs queued or running now, and how many of those are held back (not yet handed to
    # the workers, because their user has others there).
    queue_length: int
    held: int
    # From a job's creation to its (latest) start, of the jobs started in the period.
    wait_median_s: float | None
    wait_p95_s: float | None
    # The generation time of the jobs finished done in the period.
    generation_median_s: float | None
    generation_p95_s: float | None
    # (external id, display name, images delivered) of the five who had the most images in
    # the period, most first (ties by external id).
    top_users: list[tuple[str, str | None, int]]
    # Jobs whose images were withheld by the content check in the period (by when they
    # ended, or were created if no end was recorded).
    blocked: int


def stats_since(uow: UnitOfWork, since: datetime, now: datetime) -> Stats:
    session = uow.session
    since, now = _as_utc(since), _as_utc(now)

    by_status = {status.value: 0 for status in JobStatus}
    for status, count in session.execute(
        select(Job.status, func.count())
        .where(Job.created_at >= since, Job.created_at <= now)
        .group_by(Job.status)
    ):
        by_status[status] = int(count)

    images = 0
    gpu_seconds = 0.0
    generation: list[float] = []
    delivered: dict[int, int] = {}
    names: dict[int, tuple[str, str | None]] = {}
    for status, seeds, seconds, user_id, external_id, display_name in session.execute(
        select(
            Job.status,
            Job.seeds,
            Job.generation_seconds,
            User.id,
            User.external_id,
            User.display_name,
        )
        .join(User, Job.user_id == User.id)
        .where(Job.finished_at >= since, Job.finished_at <= now)
    ):
        if seconds is not None:
            gpu_seconds += float(seconds)
        if status != JobStatus.DONE:
            continue
        count = len(seeds or ())
        images += count
        if seconds is not None:
            generation.append(float(seconds))
        delivered[user_id] = delivered.get(user_id, 0) + count
        names[user_id] = (external_id, display_name)

    waits = [
        (_as_utc(started) - _as_utc(created)).total_seconds()
        for created, started in session.execute(
            select(Job.created_at, Job.started_at).where(
                Job.started_at >= since, Job.started_at <= now
            )
        )
        if started is not None
    ]

    active = list(ACTIVE_STATUSES)
    queue_length = int(
        session.scalar(select(func.count()).select_from(Job).where(Job.status.in_(active))) or 0
    )
    held = int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.status.in_(active), Job.published_at.is_(None))
        )
        or 0
    )

    ended = func.coalesce(Job.finished_at, Job.created_at)
    blocked = int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.status == JobStatus.BLOCKED, ended >= since, ended <= now)
        )
        or 0
    )

    top = sorted(delivered.items(), key=lambda item: (-item[1], names[item[0]][0]))[:TOP_USERS]
    return Stats(
        jobs_by_status=by_status,
        images=images,
        gpu_seconds=gpu_seconds,
        queue_length=queue_length,
        held=held,
        wait_median_s=percentile(waits, 50),
        wait_p95_s=percentile(waits, 95),
        generation_median_s=percentile(generation, 50),
        generation_p95_s=percentile(generation, 95),
        top_users=[(*names[user_id], count) for user_id, count in top if count > 0],
        blocked=blocked,
    )


@dataclass(frozen=True)
class QueueEntry:
    id: int
    status: str
    external_id: str
    display_name: str | None
    chat_id: int
    command: str
    created_at: datetime
    # Not yet handed to the workers (its user has others there).
    held: bool


def queue_snapshot(uow: UnitOfWork, limit: int = 10) -> list[QueueEntry]:
    """The queued and running jobs, oldest first."""
    rows = uow.session.execute(
        select(
            Job.id,
            Job.status,
            User.external_id,
            User.display_name,
            Job.chat_id,
            Job.command,
            Job.created_at,
            Job.published_at,
        )
        .join(User, Job.user_id == User.id)
        .where(Job.status.in_(list(ACTIVE_STATUSES)))
        .order_by(Job.id)
        .limit(limit)
    )
    return [
        QueueEntry(
            id=row.id,
            status=row.status,
            external_id=row.external_id,
            display_name=row.display_name,
            chat_id=row.chat_id,
            command=row.command,
            created_at=_as_utc(row.created_at),
            held=row.published_at is None,
        )
        for row in rows
    ]
