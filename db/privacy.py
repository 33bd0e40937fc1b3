"""A user's rows, for the right of access (export) and the right to erasure (forget).

`collect` gathers everything the database holds about one user; `delete` removes it. Both work
inside the caller's unit of work and do not commit. Files (results, selfie crops) are not
touched here: the record names them, and the caller deletes them after the commit
(chitrakar.privacy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, String, and_, cast, func, literal, or_, select, update
from sqlalchemy import delete as sql_delete
from sqlalchemy.orm import Session

from chitrakar.domain import ACTIVE_STATUSES, JobKind, JobStatus
from chitrakar.quota import user_account
from db import ledger, web
from db.models import (
    Account,
    AuditEvent,
    Job,
    JobEvent,
    LedgerEntry,
    Report,
    ResultMessage,
    User,
    utcnow,
)


@dataclass(frozen=True)
class UserRecord:
    """What is stored about one user, as JSON-ready values (dates and times as ISO strings)."""

    # The user's row: channel, external id, name, language, default style, created_at...
    profile: dict[str, Any]
    # Every column of each of their jobs, oldest first, each with its "events", and
    # "results_withheld": true for a job the content check blocked (its images are kept for
    # the admins' review, not handed to the user: see `withheld_keys`).
    jobs: list[dict[str, Any]]
    # Credit movements: every entry of their own account, and every entry (of any account,
    # such as a group's) about one of their jobs. Each names its "account" key.
    ledger: list[dict[str, Any]]
    # The results of their jobs: artifact keys ("results/42/0-1234.png"); a value starting
    # with "/" is a legacy absolute path of a local file. All of them, for deleting.
    artifact_keys: list[str]
    # The selfie crops (absolute paths) that are theirs: the inputs of their avatar jobs.
    input_paths: list[str]
    # A web chat user's messages with the bot (empty on other channels).
    messages: list[dict[str, Any]] = field(default_factory=list)
    # Those of `artifact_keys` that jobs blocked by the content check name: deleted with the
    # rest, but never exported (the user was told they were held back).
    withheld_keys: list[str] = field(default_factory=list)
    # The reports they filed on results (every column), oldest first.
    reports: list[dict[str, Any]] = field(default_factory=list)
    # The audit log's records of admin and moderation actions that concern them, oldest
    # first: those that name them as the target, those they took, and those on their jobs
    # (but not another member's report of one: the reporter stays unnamed). Kept by `delete`.
    moderation: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exported_keys(self) -> list[str]:
        """The results the user may have: `artifact_keys` less the withheld ones."""
        withheld = set(self.withheld_keys)
        return [key for key in self.artifact_keys if key not in withheld]


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        # SQLite keeps no time zone: what it returns was written as UTC.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def _json_row(row: Mapping[Any, Any], leave_out: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {name: _json_value(value) for name, value in row.items() if name not in leave_out}


def _columns(
    model: type[User] | type[Job] | type[JobEvent] | type[Report] | type[AuditEvent],
) -> Select[Any]:
    # Every column of the table, read as plain rows (no ORM objects enter the session): a
    # column added to the model later is exported without a change here.
    return select(*model.__table__.columns)


def _user_id(session: Session, channel: str, external_id: str) -> int | None:
    return session.scalar(
        select(User.id).where(User.channel == channel, User.external_id == external_id)
    )


def _hold(session: Session, channel: str, external_id: str) -> None:
    """Keep the user's rows from changing until the caller's transaction ends, so that the
    record names every row that is deleted: a request of theirs arriving meanwhile waits for
    the commit and is then recorded afresh (a new user row), rather than adding a job (and a
    selfie) that is deleted without the record naming it."""
    mine = (User.channel == channel, User.external_id == external_id)
    # PostgreSQL: the row lock; a new request's insert-if-absent of the row waits for it.
    session.execute(select(User.id).where(*mine).with_for_update())
    # SQLite has no row locks (and ignores FOR UPDATE): a write takes the database's write
    # lock before anything is read. On PostgreSQL this changes nothing.
    session.execute(
        update(User)
        .where(*mine)
        .values(channel=User.channel)
        .execution_options(synchronize_session=False)
    )
    # Their jobs' rows (PostgreSQL), in the order a request takes its locks (user, jobs,
    # accounts): a job of anyone's that names one of theirs as its parent (a variation of
    # their result), being taken in meanwhile, holds the parent's key lock: this waits for
    # its commit, and the detaching UPDATE, a new statement, then sees it. One taken in
    # later waits for this commit instead (and finds its parent gone).
    session.execute(
        select(Job.id)
        .where(Job.user_id.in_(select(User.id).where(*mine)))
        .order_by(Job.id)
        .with_for_update()
    )
    # Their account's row: an admin's /grant or /setquota on it, in flight, commits first,
    # and `delete` then sees its entry or its limit before deciding whether the row can go
    # (a DELETE that merely waited for the row would not see the entry under READ
    # COMMITTED, and fail the foreign key, or delete the limit just set). One arriving later
    # waits for this commit.
    session.execute(
        select(Account.id)
        .where(Account.key == user_account(channel, external_id))
        .with_for_update()
    )


def _account_id(session: Session, channel: str, external_id: str) -> int | None:
    return session.scalar(
        select(Account.id).where(Account.key == user_account(channel, external_id))
    )


def _jobs_of(user_id: int | None) -> Select[Any]:
    return select(Job.id).where(Job.user_id == user_id)


def _ledger_filter(user_id: int | None, account_id: int | None) -> Any:
    return or_(LedgerEntry.account_id == account_id, LedgerEntry.job_id.in_(_jobs_of(user_id)))


CARRIED_NOTE = "used on this day by a user since forgotten"


def _used_on(
    session: Session, user_id: int | None, account_id: int | None, day: date
) -> dict[int, int]:
    """By account, the sum of the day's entries that are the user's: their account's, and
    their jobs' on a group's. The reserves of their jobs still waiting or running are left
    out: those jobs are deleted, never made. Only sums that are not zero."""
    unmade = select(Job.id).where(Job.user_id == user_id, Job.status.in_(ACTIVE_STATUSES))
    sums = session.execute(
        select(LedgerEntry.account_id, func.sum(LedgerEntry.amount))
        .where(
            _ledger_filter(user_id, account_id),
            LedgerEntry.day == day,
            or_(LedgerEntry.job_id.is_(None), LedgerEntry.job_id.not_in(unmade)),
        )
        .group_by(LedgerEntry.account_id)
    )
    return {used_by: int(total) for used_by, total in sums if total}


def _limited(session: Session, account_id: int) -> bool:
    return session.scalar(select(Account.daily_limit).where(Account.id == account_id)) is not None


def _dedupe(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


# Who filed a report whose reporter deleted their data (no user id is ever empty).
FORGOTTEN_REPORTER = ""


def _reports_filed(channel: str, external_id: str) -> ColumnElement[bool]:
    """The reports the user filed: a report names its reporter by external id only, and
    the channel is that of the job reported."""
    on_channel = select(Job.id).where(Job.channel == channel)
    return and_(Report.reporter == external_id, Report.job_id.in_(on_channel))


def _concerning(channel: str, external_id: str, user_id: int | None) -> ColumnElement[bool]:
    """The audit events that concern the user (see UserRecord.moderation)."""
    their_jobs = select(literal("job:", String) + cast(Job.id, String)).where(
        Job.user_id == user_id
    )
    return and_(
        AuditEvent.channel == channel,
        or_(
            AuditEvent.target == f"user:{external_id}",
            AuditEvent.actor == external_id,
            and_(AuditEvent.target.in_(their_jobs), AuditEvent.action != "report"),
        ),
    )


def collect(session: Session, channel: str, external_id: str) -> UserRecord | None:
    """Everything stored about a user; None when nothing is (no user row, no account row,
    no report they filed, no audit event about them)."""
    user_id = _user_id(session, channel, external_id)
    account_id = _account_id(session, channel, external_id)
    chat = web.chat_of(external_id) if channel == web.CHANNEL else None
    messages = web.transcript(session, chat) if chat is not None else []
    reports = [
        _json_row(report)
        for report in session.execute(
            _columns(Report).where(_reports_filed(channel, external_id)).order_by(Report.id)
        ).mappings()
    ]
    moderation = [
        _json_row(event)
        for event in session.execute(
            _columns(AuditEvent)
            .where(_concerning(channel, external_id, user_id))
            .order_by(AuditEvent.id)
        ).mappings()
    ]
    if user_id is None and account_id is None and not messages and not reports and not moderation:
        return None

    profile: dict[str, Any] = {}
    if user_id is not None:
        user = session.execute(_columns(User).where(User.id == user_id)).mappings().one()
        profile = _json_row(user)

    events: dict[int, list[dict[str, Any]]] = {}
    event_rows = session.execute(
        _columns(JobEvent).where(JobEvent.job_id.in_(_jobs_of(user_id))).order_by(JobEvent.id)
    ).mappings()
    for event in event_rows:
        events.setdefault(event["job_id"], []).append(_json_row(event, frozenset({"job_id"})))

    job_list: list[dict[str, Any]] = []
    artifact_keys: list[str] = []
    withheld_keys: list[str] = []
    avatar_inputs: list[str] = []
    for job in session.execute(
        _columns(Job).where(Job.user_id == user_id).order_by(Job.id)
    ).mappings():
        withheld = job["status"] == JobStatus.BLOCKED
        job_list.append(
            {**_json_row(job), "events": events.get(job["id"], []), "results_withheld": withheld}
        )
        artifact_keys.extend(job["result_paths"] or ())
        if withheld:
            withheld_keys.extend(job["result_paths"] or ())
        if job["command"] == JobKind.AVATAR and job["input_path"] is not None:
            avatar_inputs.append(job["input_path"])

    ledger_rows = session.execute(
        select(
            Account.key.label("account"),
            LedgerEntry.kind,
            LedgerEntry.amount,
            LedgerEntry.day,
            LedgerEntry.job_id,
            LedgerEntry.note,
            LedgerEntry.at,
        )
        .join(Account, Account.id == LedgerEntry.account_id)
        .where(_ledger_filter(user_id, account_id))
        .order_by(LedgerEntry.id)
    ).mappings()

    return UserRecord(
        profile=profile,
        jobs=job_list,
        ledger=[_json_row(entry) for entry in ledger_rows],
        artifact_keys=_dedupe(artifact_keys),
        input_paths=_own_inputs(session, user_id, _dedupe(avatar_inputs)),
        messages=messages,
        withheld_keys=_dedupe(withheld_keys),
        reports=reports,
        moderation=moderation,
    )


def _own_inputs(session: Session, user_id: int | None, paths: list[str]) -> list[str]:
    """The selfies among `paths` that are this user's. An admin who presses Again under a
    member's avatar in a group makes an avatar job of their own from the member's selfie: the
    selfie stays the member's, the sender of the first job made from it (one with no parent).
    So a path that another user's first avatar job names is left out."""
    if not paths:
        return []
    others = set(
        session.scalars(
            select(Job.input_path).where(
                Job.command == JobKind.AVATAR,
                Job.parent_job_id.is_(None),
                Job.user_id != user_id,
                Job.input_path.in_(paths),
            )
        )
    )
    return [path for path in paths if path not in others]


def delete(session: Session, channel: str, external_id: str, day: date) -> UserRecord | None:
    """Delete every row about a user, after collecting them; returns the record (so that the
    caller can delete the files it names once the deletion is committed), or None when
    nothing is stored about them. Does not commit.

    Two things stay, so that forgetting is no way around a limit: a limit an admin set on
    the user's credits (their account row, as a ban stays), and the credits they used on
    `day`, the quota day under way (one entry with no job, on their account and on each
    group's; `carried_entries_due` finds them once the day is over).

    A banned user's row stays too, emptied of all but the ban, so that forgetting is no way
    around a ban either.

    Rows of other users are never deleted: a job of someone else made from one of this user's
    results (an admin's variation in a group) stays, with no parent."""
    _hold(session, channel, external_id)
    record = collect(session, channel, external_id)
    if record is None:
        return None
    user_id = _user_id(session, channel, external_id)
    account_id = _account_id(session, channel, external_id)
    their_jobs = _jobs_of(user_id)
    used_today = _used_on(session, user_id, account_id, day)

    # Jobs that start from one of theirs (their own follow-ups, or another user's) lose the
    # reference, so that their jobs can go.
    session.execute(
        update(Job)
        .where(Job.parent_job_id.in_(their_jobs))
        .values(parent_job_id=None)
        .execution_options(synchronize_session="fetch")
    )
    # Their account's entries, and every entry about one of their jobs whatever the account:
    # a group's reserve, commit or refund for their job records what they asked for and
    # links it to them (the job id), and the job it names is going. Deleted explicitly: the
    # foreign key cascades, but SQLite enforces that only with PRAGMA foreign_keys on. So the
    # group gets back the credits their jobs took that day, as the user gets a fresh quota:
    # for the ledger, the jobs were never asked for.
    session.execute(
        sql_delete(LedgerEntry)
        .where(_ledger_filter(user_id, account_id))
        .execution_options(synchronize_session="fetch")
    )
    session.execute(
        sql_delete(JobEvent)
        .where(JobEvent.job_id.in_(their_jobs))
        .execution_options(synchronize_session="fetch")
    )
    # Reports on their jobs, and where their results were posted, go with the jobs. Reports
    # they filed on others' images stay, naming no one: a reporter's /forget must not end
    # the admins' review of an image still in the chat. (The audit log keeps its record of
    # admin actions that named them: accountability.)
    session.execute(
        update(Report)
        .where(_reports_filed(channel, external_id), Report.job_id.not_in(their_jobs))
        .values(reporter=FORGOTTEN_REPORTER)
        .execution_options(synchronize_session="fetch")
    )
    session.execute(
        sql_delete(Report)
        .where(Report.job_id.in_(their_jobs))
        .execution_options(synchronize_session="fetch")
    )
    session.execute(
        sql_delete(ResultMessage)
        .where(ResultMessage.job_id.in_(their_jobs))
        .execution_options(synchronize_session="fetch")
    )
    session.execute(
        sql_delete(Job).where(Job.user_id == user_id).execution_options(synchronize_session="fetch")
    )
    # A web chat's transcript holds their prompts.
    chat = web.chat_of(external_id) if channel == web.CHANNEL else None
    if chat is not None:
        web.forget_chat(session, chat)
    for used_by, amount in used_today.items():
        session.add(
            LedgerEntry(
                account_id=used_by, kind=ledger.CARRIED, amount=amount, day=day, note=CARRIED_NOTE
            )
        )
    if (
        account_id is not None
        and account_id not in used_today
        and not _limited(session, account_id)
    ):
        session.execute(
            sql_delete(Account)
            .where(Account.id == account_id)
            .execution_options(synchronize_session="fetch")
        )
    banned = user_id is not None and bool(
        session.scalar(select(User.banned).where(User.id == user_id))
    )
    if banned:
        # The ban stands; nothing else of theirs does (the row is as a ban of someone who
        # never wrote makes it, dated now).
        session.execute(
            update(User)
            .where(User.id == user_id)
            .values(display_name=None, language="en", default_style=None, created_at=utcnow())
            .execution_options(synchronize_session="fetch")
        )
    elif user_id is not None:
        session.execute(
            sql_delete(User)
            .where(User.id == user_id)
            .execution_options(synchronize_session="fetch")
        )
    session.flush()
    return record
