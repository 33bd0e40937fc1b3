"""What the retention rules remove, found in the database. The caller deletes the files and
then records it here; nothing about a job's history (its row, events, ledger) is removed.
What a forgotten user used on a day goes once the day is over."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Select, delete, exists, select
from sqlalchemy.orm import aliased

from chitrakar.domain import ACTIVE_STATUSES, JobKind
from chitrakar.quota import USER_ACCOUNT_PREFIX
from db import ledger
from db.models import Account, Job, JobEvent, LedgerEntry
from db.session import UnitOfWork


def results_due(uow: UnitOfWork, finished_before: datetime) -> list[int]:
    """Jobs that ended before the cut-off and still hold results, except those a queued or
    running variation or upscale starts from (kept until it ends)."""
    return list(
        uow.session.scalars(
            select(Job.id)
            .where(
                Job.finished_at < finished_before,
                Job.result_paths.is_not(None),
                Job.id.not_in(_awaited_parents()),
            )
            .order_by(Job.id)
        )
    )


def unnamed_results_due(
    uow: UnitOfWork, job_ids: list[int], finished_before: datetime
) -> list[int]:
    """Of `job_ids` (jobs that have result files stored), those that ended before the
    cut-off without naming them: a job that failed between storing its images and naming
    them (a content check or database error, a worker that died and a later attempt given
    up). Their files are deleted; there is nothing to record. (Named ones: results_due.)"""
    ended: list[int] = []
    for start in range(0, len(job_ids), _IDS_PER_QUERY):
        ended.extend(
            uow.session.scalars(
                select(Job.id).where(
                    Job.id.in_(job_ids[start : start + _IDS_PER_QUERY]),
                    Job.status.not_in(list(ACTIVE_STATUSES)),
                    Job.finished_at < finished_before,
                    Job.result_paths.is_(None),
                    Job.id.not_in(_awaited_parents()),
                )
            )
        )
    return sorted(ended)


# Bound parameters per query, well under SQLite's and PostgreSQL's limits.
_IDS_PER_QUERY = 1000


def _awaited_parents() -> Select[int | None]:
    """The jobs whose result a queued or running job starts from (its input, read when it
    runs: the press was accepted because the result existed)."""
    child = aliased(Job)
    return select(child.parent_job_id).where(
        child.status.in_(list(ACTIVE_STATUSES)), child.parent_job_id.is_not(None)
    )


def forget_results(uow: UnitOfWork, job_id: int, why: str = "retention") -> None:
    """Record that a job's results were deleted (their files are gone, and Telegram's copies
    are no longer offered again). Commits."""
    job = uow.session.get(Job, job_id)
    if job is None:
        return
    job.result_paths = job.result_checksums = job.result_file_ids = None
    job.events.append(JobEvent(status=job.status, detail=f"results deleted ({why})"))
    uow.commit()


def inputs_due(uow: UnitOfWork, ended_before: datetime) -> list[str]:
    """Selfie crops whose avatar jobs (an original and its Again presses) all ended before
    the cut-off."""
    rows = uow.session.execute(
        select(Job.input_path, Job.status, Job.finished_at).where(
            Job.command == JobKind.AVATAR, Job.input_path.is_not(None)
        )
    ).all()
    latest: dict[str, datetime | None] = {}
    busy: set[str] = set()
    for path, status, finished_at in rows:
        if path is None:
            continue
        if status in ACTIVE_STATUSES or finished_at is None:
            busy.add(path)
            continue
        known = latest.get(path)
        latest[path] = finished_at if known is None else max(known, finished_at)
    return sorted(
        path
        for path, finished in latest.items()
        if path not in busy and finished is not None and _utc(finished) < _utc(ended_before)
    )


def forget_input(uow: UnitOfWork, path: str) -> None:
    """Record that a selfie crop was deleted: every job that used it. Commits."""
    for job in uow.session.scalars(select(Job).where(Job.input_path == path)):
        job.input_path = None
    uow.commit()


def forget_carried_before(uow: UnitOfWork, day: date) -> int:
    """Delete what forgotten users used on days before `day` (kept only while it counts
    against a limit: db.privacy.delete), and a user's account left with no entry and no
    limit (a group's stays, as its settings do). Commits; how many entries went."""
    carried = LedgerEntry.kind == ledger.CARRIED
    accounts = list(
        uow.session.scalars(
            select(LedgerEntry.account_id).where(carried, LedgerEntry.day < day).distinct()
        )
    )
    gone = cast(
        CursorResult[Any],
        uow.session.execute(
            delete(LedgerEntry).where(carried, LedgerEntry.day < day),
            execution_options={"synchronize_session": False},
        ),
    ).rowcount
    unused = ~exists().where(LedgerEntry.account_id == Account.id)
    # Locked first, skipping a row a returning user's reserve holds: a DELETE that waited on
    # it would, under READ COMMITTED, not see the entry it adds, and fail the foreign key.
    # Once locked, no entry can be added to them; the DELETE, a new statement, sees every
    # entry added before. (SQLite has no row locks: its writers take turns.)
    doomed = list(
        uow.session.scalars(
            select(Account.id)
            .where(
                Account.id.in_(accounts),
                Account.key.startswith(USER_ACCOUNT_PREFIX),
                Account.daily_limit.is_(None),
                unused,
            )
            .with_for_update(skip_locked=True)
        )
    )
    if doomed:
        uow.session.execute(
            delete(Account)
            .where(Account.id.in_(doomed), unused)
            .execution_options(synchronize_session=False)
        )
    uow.commit()
    return gone


def existing_job_ids(uow: UnitOfWork, job_ids: list[int]) -> set[int]:
    return set(uow.session.scalars(select(Job.id).where(Job.id.in_(job_ids))))


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no time zone: what it returns was written as UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
