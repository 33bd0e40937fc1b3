"""Job records: every change to a job goes through these functions, inside a unit of work."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    Select,
    Table,
    and_,
    bindparam,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from chitrakar.domain import (
    ACTIVE_STATUSES,
    TRANSITIONS,
    GenerationPlan,
    InvalidTransition,
    JobKind,
    JobStatus,
    batch_key,
    check_transition,
)
from chitrakar.quota import Account, QuotaExceeded
from db import heartbeats, ledger
from db.models import Job, JobEvent, ResultMessage, User, utcnow
from db.session import UnitOfWork, dialect_name, insert_in

log = logging.getLogger(__name__)

# The tables, for Core statements on the hot paths (the bot's intake, the worker's records).
JOBS = cast(Table, Job.__table__)
JOB_EVENTS = cast(Table, JobEvent.__table__)
USERS = cast(Table, User.__table__)


def _may_become(new: JobStatus) -> list[JobStatus]:
    """The statuses a job may move to `new` from."""
    return [status for status in JobStatus if new in TRANSITIONS[status]]


# Statements of every request and every job (the bot's intake, the worker's records), built
# once: building one costs more than running it (an INSERT's values are the parameters it is
# executed with). The rest of the module's statements run far less often and are built
# where they run.
_NEW_JOB = insert(JOBS).returning(JOBS.c.id)
_NEW_EVENT = insert(JOB_EVENTS)
_AHEAD = (
    select(func.count())
    .select_from(JOBS)
    .where(
        JOBS.c.status.in_(list(ACTIVE_STATUSES)),
        JOBS.c.id < bindparam("job_id"),
        JOBS.c.published_at.is_not(None),
    )
)
_DEFAULT_STYLES = select(USERS.c.external_id, USERS.c.default_style).where(
    USERS.c.channel == bindparam("channel"),
    USERS.c.external_id.in_(bindparam("external_ids", expanding=True)),
    USERS.c.default_style.is_not(None),
)
# Starting a job (the worker's first write for each): from queued, or again from running
# (its task delivered again after its worker died), unless a worker alive since
# :alive_since holds it. On this worker itself, a job left running is taken up (a batch
# mate claimed by a task that failed before making it) unless its results were recorded and
# their delivery was not: whether its photo went out is not known, and it must not go twice.
_START = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("job_id"),
        JOBS.c.status.in_(_may_become(JobStatus.RUNNING)),
        or_(
            JOBS.c.status != JobStatus.RUNNING,
            JOBS.c.worker.is_(None),
            and_(
                JOBS.c.worker == bindparam("worker_name"),
                or_(JOBS.c.result_paths.is_(None), JOBS.c.delivered_at.is_not(None)),
            ),
            JOBS.c.worker.not_in(heartbeats.alive_names(bindparam("alive_since"))),
        ),
    )
    .values(
        status=JobStatus.RUNNING,
        attempts=JOBS.c.attempts + 1,
        worker=bindparam("worker_name"),
        started_at=bindparam("now"),
    )
    .returning(
        *JOBS.c,
        select(USERS.c.external_id)
        .where(USERS.c.id == JOBS.c.user_id)
        .scalar_subquery()
        .label("requester"),
    )
)
# Naming a job's results, on the path of every result before it is sent.
_RECORD_RESULTS = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("job_id"),
        JOBS.c.status == JobStatus.RUNNING,
        JOBS.c.worker == bindparam("worker_name"),
    )
    .values(result_paths=bindparam("paths"), result_checksums=bindparam("checksums"))
    .returning(JOBS.c.status_message_id)
)
_STATUS_MESSAGE = select(JOBS.c.status, JOBS.c.worker, JOBS.c.status_message_id).where(
    JOBS.c.id == bindparam("job_id")
)
# Ending a job that delivered its results (every job's last write), and recording what a
# job cancelled meanwhile delivered.
_COMPLETE = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("job_id"),
        JOBS.c.status.in_(_may_become(JobStatus.DONE)),
    )
    .values(
        status=JobStatus.DONE,
        result_paths=bindparam("paths"),
        result_checksums=bindparam("checksums"),
        result_file_ids=bindparam("file_ids"),
        generation_seconds=bindparam("seconds"),
        finished_at=bindparam("now"),
    )
    .returning(JOBS.c.id)
)
_RESULTS_OF_CANCELLED = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("job_id"), JOBS.c.status == JobStatus.CANCELLED)
    .values(
        result_paths=bindparam("paths"),
        result_checksums=bindparam("checksums"),
        result_file_ids=bindparam("file_ids"),
    )
)
_STATUS_AND_WORKER = select(JOBS.c.status, JOBS.c.worker).where(JOBS.c.id == bindparam("job_id"))
_ATTACH_STATUS = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("job_id"),
        JOBS.c.status.in_(list(ACTIVE_STATUSES)),
        JOBS.c.result_paths.is_(None),
    )
    .values(status_message_id=bindparam("message_id"))
)


@dataclass(frozen=True)
class Origin:
    """Where a request came from and where its answer goes."""

    channel: str
    chat_id: int
    chat_type: str
    user_external_id: str
    user_display_name: str | None
    language: str
    # The message answers reply to: the command, or the result whose button was pressed.
    request_message_id: int | None
    # What made the request, unique per chat: "message:<id>" by default; a button press
    # passes "button:<callback query id>".
    trigger: str | None = None

    @property
    def request_key(self) -> str:
        if self.trigger is not None:
            return self.trigger
        if self.request_message_id is None:
            raise ValueError("a request needs a message id or a trigger")
        return f"message:{self.request_message_id}"


@dataclass(frozen=True)
class JobView:
    """A detached, read-only copy of a job for code outside the transaction."""

    id: int
    kind: JobKind
    status: JobStatus
    channel: str
    chat_id: int
    chat_type: str
    requester: str
    request_message_id: int | None
    status_message_id: int | None
    language: str
    plan: GenerationPlan
    attempts: int
    created_at: datetime
    started_at: datetime | None
    input_path: str | None = None
    result_file_ids: tuple[str, ...] = ()
    parent_job_id: int | None = None
    parent_index: int | None = None
    # Artifact keys of the results and their SHA-256, in image order.
    result_paths: tuple[str, ...] = ()
    result_checksums: tuple[str, ...] = ()
    # What the user typed as options (those they set), for captions.
    options: dict[str, Any] = field(default_factory=dict)
    cost: int = 0
    # The worker that holds (or last held) it, and whether its result reached the chat.
    worker: str | None = None
    delivered: bool = False

    @classmethod
    def of(cls, job: Job) -> JobView:
        return cls.of_columns(job, job.user.external_id)

    @classmethod
    def of_columns(cls, job: Any, requester: str) -> JobView:
        """From anything that has the job's columns as attributes: a `Job`, or a row of
        the jobs table (whose user is not loaded: `requester` is their external id)."""
        return cls(
            id=job.id,
            kind=JobKind(job.command),
            status=JobStatus(job.status),
            channel=job.channel,
            chat_id=job.chat_id,
            chat_type=job.chat_type,
            requester=requester,
            request_message_id=job.request_message_id,
            status_message_id=job.status_message_id,
            language=job.language,
            plan=plan_of(job),
            attempts=job.attempts,
            created_at=_as_utc(job.created_at),
            started_at=_as_utc(job.started_at) if job.started_at else None,
            input_path=job.input_path,
            parent_job_id=job.parent_job_id,
            parent_index=job.parent_index,
            result_paths=tuple(job.result_paths or ()),
            result_checksums=tuple(job.result_checksums or ()),
            result_file_ids=tuple(job.result_file_ids or ()),
            options=dict(job.options or {}),
            cost=job.cost or 0,
            worker=job.worker,
            delivered=job.delivered_at is not None,
        )


def plan_of(job: Any) -> GenerationPlan:
    """The plan a job row records (reads no related rows)."""
    return GenerationPlan(
        prompt=job.prompt,
        width=job.width,
        height=job.height,
        steps=job.steps,
        seeds=tuple(job.seeds),
        guidance_scale=job.guidance_scale,
        negative_prompt=job.negative_prompt or "",
        style=job.style,
        strength=job.strength,
        lora=job.lora,
        lora_scale=job.lora_scale if job.lora_scale is not None else 1.0,
    )


def _as_utc(moment: datetime) -> datetime:
    # SQLite keeps no time zone: what it returns was written as UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Charge:
    """What a new job costs and who pays, on which quota day."""

    accounts: tuple[Account, ...]
    cost: int
    day: date


class JobNotFound(LookupError):
    pass


class HandedBack(Exception):
    """The job is no longer this worker's: handed back to the queue, running on another
    worker, or ended by one."""


class Cancelled(Exception):
    """The job was cancelled by its user (and refunded) before its results were sent."""


class DuplicateRequest(Exception):
    """The chat message already made a job (its update came twice)."""

    def __init__(self, job: JobView) -> None:
        super().__init__(job.id)
        self.job = job


@cache
def _user_upsert(dialect: str) -> Any:
    statement = insert_in(dialect, USERS)
    return statement.on_conflict_do_update(
        index_elements=["channel", "external_id"],
        set_={
            "display_name": statement.excluded.display_name,
            "language": statement.excluded.language,
        },
    ).returning(USERS.c.id)


def _user_id_for(connection: Connection, origin: Origin) -> int:
    """The user's row id, made if new, with the name and language this request gives. One
    upsert, since two requests from a new user can arrive at once; it also takes the row's
    lock (PostgreSQL) or the write lock (SQLite) for the rest of the transaction, which
    serialises the hand-overs of one user's jobs."""
    values = {
        "channel": origin.channel,
        "external_id": origin.user_external_id,
        "display_name": origin.user_display_name,
        "language": origin.language,
        "created_at": utcnow(),
    }
    return int(connection.execute(_user_upsert(dialect_name(connection)), values).scalar_one())


def lock_for_taking_in(
    uow: UnitOfWork, origins: Sequence[Origin], charges: Sequence[Charge]
) -> None:
    """Before several requests are taken in in one transaction, on PostgreSQL: every row lock
    they will take, taken now in one order (their users, then the accounts that pay, each by
    key), the order one request takes its own in (its user, then its accounts by key). Taken
    as each request came, two such transactions sharing a user, or a user and a group, could
    each wait on the other. On SQLite nothing: its one write lock is the whole database's."""
    connection = uow.connection
    if dialect_name(connection) == "sqlite":
        return
    users = {(origin.channel, origin.user_external_id): origin for origin in origins}
    for key in sorted(users):
        _user_id_for(connection, users[key])
    ledger.lock_accounts(
        connection,
        (
            account.key
            for charge in charges
            for account in ledger.paying(charge.accounts, charge.cost)
        ),
    )


def _user_for(session: Session, origin: Origin) -> User:
    """The user's row (see `_user_id_for`)."""
    user = session.get(User, _user_id_for(session.connection(), origin), populate_existing=True)
    assert user is not None
    return user


def _load(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


def _set_status(job: Job, status: JobStatus, detail: str | None = None) -> None:
    check_transition(JobStatus(job.status), status)
    job.status = status
    job.events.append(JobEvent(status=status, detail=detail))


# A job no run has released to its chat: no results recorded, or recorded by a run that
# ended without sending them (its worker died, and the job was handed back to the queue).
_UNRELEASED = or_(Job.result_paths.is_(None), Job.status != JobStatus.RUNNING)


def _move(
    session: Session,
    job: Job,
    new: JobStatus,
    detail: str | None = None,
    only_from: Sequence[JobStatus] | None = None,
    worker: str | None = None,
    unreleased: bool = False,
) -> bool:
    """Move a job to `new` only if, at the moment of writing, it is still in a status that
    may go there (or in `only_from`). The conditional UPDATE decides between a worker
    finishing a job and its user cancelling it at the same moment (it waits for the other's
    row lock on PostgreSQL, for the write lock on SQLite); the loser sees the winner's
    status. False if it lost. Given a `worker`, only while the job is on that worker;
    `unreleased`, only while its run has recorded no results (a job handed back to the queue
    after its worker died with results recorded is made again: it is unreleased)."""
    allowed = list(only_from) if only_from else _may_become(new)
    conditions = [Job.worker == worker] if worker is not None else []
    if unreleased:
        conditions.append(_UNRELEASED)
    moved = cast(
        CursorResult[Any],
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status.in_(allowed), *conditions)
            .values(status=new)
        ),
    )
    session.refresh(job)
    if moved.rowcount != 1:
        return False
    job.events.append(JobEvent(status=new, detail=detail))
    return True


@dataclass(frozen=True)
class TakenIn:
    job_id: int
    # Marked handed to the broker (the caller publishes it); False: held back, its user has
    # their share of jobs in flight.
    handed_over: bool
    # Its place in the queue (see queue_position).
    position: int


def take_in(
    uow: UnitOfWork,
    origin: Origin,
    kind: JobKind,
    plan: GenerationPlan,
    *,
    options: dict[str, Any] | None = None,
    input_path: str | None = None,
    parent_job_id: int | None = None,
    parent_index: int | None = None,
    charge: Charge | None = None,
    hand_over_limit: int | None = None,
    commit: bool = True,
) -> TakenIn:
    """Record an accepted request as a queued job and reserve its credits, together, in one
    transaction: marked handed over at once when its user has fewer than `hand_over_limit`
    jobs in flight (None: held). Commits, unless `commit` is False (the caller commits
    several requests at once). Raises DuplicateRequest when the same message or button
    press already made a job, and QuotaExceeded (recording nothing) when a paying account
    is short; either rolls back the whole transaction, whatever else it held."""
    # Core statements built once, on the connection, not the ORM's unit of work: this runs
    # for every request.
    session, connection, now = uow.session, uow.connection, utcnow()
    try:
        # The upsert holds the user's lock (as claim_hand_over does) until the commit.
        user_id = _user_id_for(connection, origin)
        handed_over = (
            hand_over_limit is not None and _in_flight(connection, user_id) < hand_over_limit
        )
        job_id = connection.execute(
            _NEW_JOB,
            dict(
                user_id=user_id,
                channel=origin.channel,
                chat_id=origin.chat_id,
                chat_type=origin.chat_type,
                trigger=origin.request_key,
                request_message_id=origin.request_message_id,
                language=origin.language,
                command=kind,
                prompt=plan.prompt,
                negative_prompt=plan.negative_prompt,
                style=plan.style,
                strength=plan.strength,
                lora=plan.lora,
                lora_scale=plan.lora_scale,
                options=options or {},
                width=plan.width,
                height=plan.height,
                steps=plan.steps,
                guidance_scale=plan.guidance_scale,
                seeds=list(plan.seeds),
                input_path=input_path,
                parent_job_id=parent_job_id,
                parent_index=parent_index,
                cost=charge.cost if charge else 0,
                status=JobStatus.QUEUED,
                attempts=0,
                published_at=now if handed_over else None,
                created_at=now,
            ),
        ).scalar_one()
        connection.execute(_NEW_EVENT, {"job_id": job_id, "status": JobStatus.QUEUED, "at": now})
        if charge is not None:
            ledger.reserve(connection, charge.accounts, job_id, charge.cost, charge.day)
        position = queue_position(uow, job_id)
        if commit:
            uow.commit()
    except QuotaExceeded:
        session.rollback()
        raise
    except IntegrityError:
        session.rollback()
        existing = session.scalar(
            select(Job).where(
                Job.channel == origin.channel,
                Job.chat_id == origin.chat_id,
                Job.trigger == origin.request_key,
            )
        )
        if existing is None:
            raise
        raise DuplicateRequest(JobView.of(existing)) from None
    return TakenIn(int(job_id), handed_over, position)


def queue_position(uow: UnitOfWork, job_id: int) -> int:
    """1 for the next job to run: active jobs handed to the workers before this one, plus
    one. Jobs held back (another user's flood) are not ahead of it."""
    ahead = uow.connection.scalar(_AHEAD, {"job_id": job_id})
    return int(ahead or 0) + 1


def active_job_ids(uow: UnitOfWork) -> list[int]:
    """Jobs queued or running, oldest first."""
    return list(
        uow.session.scalars(
            select(Job.id).where(Job.status.in_(list(ACTIVE_STATUSES))).order_by(Job.id)
        )
    )


def get_job(uow: UnitOfWork, job_id: int) -> JobView | None:
    job = uow.session.get(Job, job_id)
    return JobView.of(job) if job is not None else None


def active_job_of_kind(uow: UnitOfWork, kind: JobKind) -> int | None:
    """The oldest queued or running job of a kind, if any."""
    return uow.session.scalar(
        select(Job.id)
        .where(Job.command == kind, Job.status.in_(list(ACTIVE_STATUSES)))
        .order_by(Job.id)
        .limit(1)
    )


def default_styles_of(
    uow: UnitOfWork, channel: str, external_ids: Collection[str]
) -> dict[str, str]:
    """The default style of each of these users who chose one, in one statement."""
    found = uow.connection.execute(
        _DEFAULT_STYLES, {"channel": channel, "external_ids": external_ids}
    )
    return {row.external_id: row.default_style for row in found}


def set_default_style(uow: UnitOfWork, origin: Origin, style: str | None) -> None:
    _user_for(uow.session, origin).default_style = style
    uow.commit()


def attach_status_message(uow: UnitOfWork, job_id: int, message_id: int) -> bool:
    """Record the status message a job's user was sent. The job may be on a worker already
    (the bot hands it over while the message is on its way): True when recorded, for its
    worker to find (it shows progress on it and removes it once the result is sent). False,
    and nothing recorded, when the job is gone, ended or had its results recorded first: no
    worker will look for the message again, so only the caller may remove it. Commits."""
    return attach_status_messages(uow, [(job_id, message_id)])[0]


def attach_status_messages(uow: UnitOfWork, sent: Sequence[tuple[int, int]]) -> list[bool]:
    """`attach_status_message` for each (job id, message id), in one transaction."""
    # One conditional write each: it waits for the row's lock (SQLite's write lock) and judges
    # the row as the worker's `record_results` left it, so the two happen in one order or the
    # other. In the jobs' order, so that two such batches never wait for each other's locks.
    connection = uow.connection
    recorded = {
        job_id: bool(
            cast(
                CursorResult[Any],
                connection.execute(_ATTACH_STATUS, {"job_id": job_id, "message_id": message_id}),
            ).rowcount
        )
        for job_id, message_id in sorted(sent)
    }
    uow.commit()
    return [recorded[job_id] for job_id, _ in sent]


def start_job(
    uow: UnitOfWork, job_id: int, worker: str, alive_since: datetime | None = None
) -> JobView | None:
    """Mark a job running for this attempt. None when it has already ended, or when another
    worker that beat since `alive_since` is running it (a duplicate delivery of its task):
    there is nothing left to do. Commits. (Core statements: a `Job` this session loaded
    before is not refreshed.)"""
    connection, now = uow.connection, utcnow()
    # One conditional UPDATE decides, under the row's lock (SQLite's write lock), between
    # two workers given the same job: the second sees the first's worker, alive.
    started = connection.execute(
        _START, {"job_id": job_id, "worker_name": worker, "now": now, "alive_since": alive_since}
    ).first()
    if started is None:
        found = connection.execute(_STATUS_AND_WORKER, {"job_id": job_id}).first()
        uow.commit()
        if found is None:
            raise JobNotFound(job_id)
        if found.status == JobStatus.RUNNING:
            log.info(
                "job %s is running on %s, which is alive: not started again", job_id, found.worker
            )
        return None
    detail = f"attempt {started.attempts} on {worker}"
    connection.execute(
        _NEW_EVENT, {"job_id": job_id, "status": JobStatus.RUNNING, "detail": detail, "at": now}
    )
    uow.commit()
    return JobView.of_columns(started, started.requester)


# Queued jobs looked at per batch: enough to find companions behind a few of other shapes.
BATCH_SCAN_LIMIT = 64


def claim_batch(
    uow: UnitOfWork, leader: JobView, worker: str, max_images: int, exclude: Sequence[int] = ()
) -> list[JobView]:
    """Start, on this worker, queued jobs that can be drawn in one pipeline call with the
    leader (same `batch_key`), oldest first, while the batch stays within `max_images`.
    Only first attempts are taken, so a job that kills its worker cannot use up its batch
    mates' attempts; never a held job (it waits its user's turn) nor one already delivered
    (handed back after its result was sent: its own message only records its end). Each is
    claimed by a conditional UPDATE from queued, so a job another worker has just started
    is skipped; on PostgreSQL rows another worker is claiming are skipped, not waited for.
    The companions' own messages then find them running on a live worker, or ended, and
    do nothing. Commits."""
    key = batch_key(leader.kind, leader.plan)
    room = max_images // len(leader.plan.seeds) - 1 - len(exclude)
    if key is None or room <= 0:
        return []
    candidates = uow.session.scalars(
        select(Job)
        .where(
            Job.status == JobStatus.QUEUED,
            Job.command == leader.kind.value,
            Job.published_at.is_not(None),
            Job.delivered_at.is_(None),
            Job.attempts == 0,
            Job.id.not_in([leader.id, *exclude]),
            Job.width == leader.plan.width,
            Job.height == leader.plan.height,
            Job.steps == leader.plan.steps,
        )
        .order_by(Job.id)
        .limit(BATCH_SCAN_LIMIT)
        .with_for_update(skip_locked=True)
    )
    claimed = []
    for job in candidates:
        # The plan alone: a whole JobView would load each candidate's user.
        if batch_key(JobKind(job.command), plan_of(job)) != key:
            continue
        detail = f"attempt {job.attempts + 1} on {worker} (batched with job {leader.id})"
        if not _move(uow.session, job, JobStatus.RUNNING, detail, only_from=[JobStatus.QUEUED]):
            continue
        job.attempts += 1
        job.worker = worker
        job.started_at = utcnow()
        claimed.append(JobView.of(job))
        if len(claimed) >= room:
            break
    uow.commit()
    return claimed


def queued_elsewhere(uow: UnitOfWork, exclude: Sequence[int]) -> bool:
    """Whether any job handed to the broker still waits (the worker is under load)."""
    return (
        uow.session.scalar(
            select(Job.id)
            .where(
                Job.status == JobStatus.QUEUED,
                Job.published_at.is_not(None),
                Job.id.not_in(list(exclude)),
            )
            .limit(1)
        )
        is not None
    )


def record_results(
    uow: UnitOfWork,
    job_id: int,
    worker: str,
    result_paths: list[str],
    result_checksums: list[str],
) -> int | None:
    """Name a running job's results once they may be shown (stored, and past the content
    check), before they are sent: a channel that serves them itself (the web chat) can do so
    as soon as the message that shows them arrives. A job that sends none of them (a preview
    grid) records an empty list. Returns the job's status message, as recorded by then: the
    bot records none after this (`attach_status_message`). Raises HandedBack when the job is
    no longer this worker's (the reconciler took the worker for dead meanwhile): another
    worker sends it; Cancelled when its user cancelled it after the worker's last look (its
    credits are back, "Cancelled." shown): nothing of it may be sent; JobNotFound when it is
    gone (its user had everything about them deleted): nothing of it may be sent either.
    Commits."""
    connection = uow.connection
    recorded = connection.execute(
        _RECORD_RESULTS,
        {
            "job_id": job_id,
            "worker_name": worker,
            "paths": result_paths,
            "checksums": result_checksums,
        },
    ).first()
    if recorded is not None:
        uow.commit()
        return cast(int | None, recorded.status_message_id)
    found = connection.execute(_STATUS_MESSAGE, {"job_id": job_id}).first()
    uow.commit()
    if found is None:
        raise JobNotFound(job_id)
    if found.status == JobStatus.CANCELLED:
        # After the last look, before anything was sent: it is not sent. (A cancellation
        # that lands once the results are on their way is `complete_job`'s.)
        raise Cancelled(job_id)
    # Queued again, running on another worker, or ended by one.
    raise HandedBack(job_id)


def replace_queued_input(uow: UnitOfWork, job_id: int, lost: str, replacement: str) -> bool:
    """Point a job still queued with input `lost` at `replacement`; whether it did (a worker
    may have started it, or another asking replaced it, meanwhile). Commits."""
    replaced = cast(
        CursorResult[Any],
        uow.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.input_path == lost, Job.status == JobStatus.QUEUED)
            .values(input_path=replacement)
        ),
    )
    uow.commit()
    return replaced.rowcount == 1


def move_to_chat(
    uow: UnitOfWork, channel: str, old_chat_id: int, new_chat_id: int, job_id: int | None = None
) -> int:
    """Move a chat's jobs (or one of them) to the id its group has as a supergroup, so that
    /cancel, /history, their buttons and /report find them there. The old chat's message ids
    mean nothing in the new one, and its triggers would clash with the new chat's own
    ("message:<id>" counts from 1 again). How many moved; does not commit."""
    moved = cast(
        CursorResult[Any],
        uow.session.execute(
            update(Job)
            .where(
                Job.channel == channel,
                Job.chat_id == old_chat_id,
                *([Job.id == job_id] if job_id is not None else []),
            )
            .values(
                chat_id=new_chat_id,
                trigger=literal(f"migrated:{old_chat_id}:") + Job.trigger,
                request_message_id=None,
                status_message_id=None,
            )
            .execution_options(synchronize_session=False)
        ),
    )
    return moved.rowcount


def mark_delivered(
    uow: UnitOfWork, job_id: int, chat_id: int, file_ids: list[str], message_ids: list[int]
) -> None:
    """The chat has the result: recorded at once, so that a redelivered task (its worker
    died before recording the end) does not send it again. A result sent to another chat
    than the job's (its group became a supergroup) moves the job there, so that its buttons
    and /report work where it is. Commits."""
    job = _load(uow.session, job_id)
    if chat_id != job.chat_id:
        move_to_chat(uow, job.channel, job.chat_id, chat_id, job_id=job_id)
        uow.session.refresh(job)
    job.delivered_at = utcnow()
    job.result_file_ids = file_ids
    # A reply to any of these messages (/report) finds the job.
    record_result_messages(uow, job_id, chat_id, message_ids)


def hand_back_from_dead_workers(uow: UnitOfWork, alive: set[str]) -> list[int]:
    """Running jobs whose worker stopped beating go back to the queue (their attempts kept,
    so a job that kills its workers is given up after MAX_ATTEMPTS). Commits; their ids."""
    running = uow.session.execute(
        select(Job.id, Job.worker).where(Job.status == JobStatus.RUNNING).order_by(Job.id)
    ).all()
    handed = [
        job_id
        for job_id, worker in running
        if worker not in alive and _hand_back(uow, job_id, worker, f"{worker} stopped")
    ]
    uow.commit()
    return handed


def hand_back_delivered(uow: UnitOfWork, job_ids: Sequence[int], worker: str) -> list[int]:
    """Those of the jobs still running on this worker whose result was delivered go back to
    the queue: their end could not be recorded, and the message that would record it was
    taken while their batch was being finished. Published again, they record the end and
    send nothing. Commits; their ids."""
    delivered = uow.session.scalars(
        select(Job.id).where(
            Job.id.in_(list(job_ids)),
            Job.status == JobStatus.RUNNING,
            Job.worker == worker,
            Job.delivered_at.is_not(None),
        )
    ).all()
    handed = [job_id for job_id in delivered if _hand_back(uow, job_id, worker, "end unrecorded")]
    uow.commit()
    return handed


def hand_back_unseen_claims(
    uow: UnitOfWork,
    worker: str,
    claimed_since: datetime,
    claimed_until: datetime,
    kept: Sequence[int],
) -> list[int]:
    """Jobs this worker started between `claimed_since` and `claimed_until` and is not
    making (not in `kept`), unmade, go back to the queue: claimed for a batch whose claims'
    outcome was lost (the database went away meanwhile). Nobody else would take them up:
    their own messages find them running on a live worker. A worker runs one task at a
    time, so every job started on it while its leader claimed was claimed for that leader.
    Commits; their ids."""
    unseen = uow.session.scalars(
        select(Job.id).where(
            Job.status == JobStatus.RUNNING,
            Job.worker == worker,
            Job.started_at >= claimed_since,
            Job.started_at <= claimed_until,
            Job.result_paths.is_(None),
            Job.delivered_at.is_(None),
            Job.id.not_in(list(kept)),
        )
    ).all()
    why = "its batch lost track of it"
    handed = [job_id for job_id in unseen if _hand_back(uow, job_id, worker, why)]
    uow.commit()
    return handed


def _hand_back(uow: UnitOfWork, job_id: int, worker: str | None, why: str) -> bool:
    # Conditional: a worker that comes back and finishes meanwhile wins.
    moved = cast(
        CursorResult[Any],
        uow.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker == worker)
            .values(status=JobStatus.QUEUED, published_at=utcnow())
        ),
    )
    if moved.rowcount != 1:
        return False
    uow.session.add(JobEvent(job_id=job_id, status=JobStatus.QUEUED, detail=f"handed back: {why}"))
    return True


def republish_due(uow: UnitOfWork, published_before: datetime) -> list[int]:
    """Queued jobs handed to the broker before `published_before` and not started since: their
    message may have been lost (a broker that restarted without persistence). Marked as
    published now; their ids, to publish again (a copy that was not lost finds the job
    started or ended, and does nothing). Commits."""
    due = list(
        uow.session.scalars(
            select(Job)
            .where(
                Job.status == JobStatus.QUEUED,
                Job.published_at.is_not(None),
                Job.published_at < published_before,
            )
            .order_by(Job.id)
        )
    )
    for job in due:
        job.published_at = utcnow()
    uow.commit()
    return [job.id for job in due]


def complete_job(
    uow: UnitOfWork,
    job_id: int,
    *,
    result_paths: list[str],
    result_file_ids: list[str],
    result_checksums: list[str] | None = None,
    generation_seconds: float | None,
) -> None:
    """Record a job's end once its images were delivered: done, its credits spent. A job
    cancelled meanwhile (only possible before its results were recorded: `cancel_jobs`)
    stays cancelled and refunded; what was delivered is recorded all the same. A job already
    done is left as it is (a retry whose first commit was written). Commits. (Core
    statements: a `Job` this session loaded before is not refreshed.)"""
    connection, now = uow.connection, utcnow()
    results = {
        "job_id": job_id,
        "paths": result_paths,
        "file_ids": result_file_ids,
        "checksums": result_checksums,
    }
    # One conditional UPDATE decides between this end and a cancellation at the same moment.
    done = connection.execute(
        _COMPLETE, {**results, "seconds": generation_seconds, "now": now}
    ).first()
    if done is None:
        found = connection.execute(_STATUS_AND_WORKER, {"job_id": job_id}).first()
        if found is None:
            raise JobNotFound(job_id)
        if found.status == JobStatus.DONE:
            # Recorded already: this is the same record tried again after the answer to its
            # commit was lost (or a redelivered task's), and the job's end stands.
            uow.commit()
            return
        if found.status != JobStatus.CANCELLED:
            raise InvalidTransition(f"job {job_id} cannot go from {found.status} to done")
        connection.execute(_RESULTS_OF_CANCELLED, results)
        uow.commit()
        return
    connection.execute(_NEW_EVENT, {"job_id": job_id, "status": JobStatus.DONE, "at": now})
    ledger.commit(connection, job_id)
    uow.commit()


def fail_job(uow: UnitOfWork, job_id: int, error: str, worker: str | None = None) -> JobView | None:
    """Mark a job failed with the reason, its credits refunded; None when it had already
    ended. Given the `worker` that runs it, only while it runs there (a job handed back
    meanwhile is another attempt's); and a job that worker already failed with this very
    reason is returned as failed now (not refunded again): the same record tried again after
    the answer to its commit was lost, whose user is still to be told. Commits."""
    job = _load(uow.session, job_id)
    only_from = [JobStatus.RUNNING] if worker is not None else None
    if not _move(uow.session, job, JobStatus.FAILED, error, only_from, worker):
        uow.commit()
        again = (
            worker is not None
            and job.status == JobStatus.FAILED
            and (job.worker, job.error) == (worker, error)
        )
        return JobView.of(job) if again else None
    ledger.refund(uow.session, job_id)
    job.error = error
    job.finished_at = utcnow()
    uow.commit()
    return JobView.of(job)


def _user_lock(connection: Connection, user_id: int) -> None:
    """Serialise hand-overs of one user's jobs (their row's lock, or SQLite's write lock)."""
    connection.execute(_LOCK_USER, {"user_id": user_id})


def _in_flight_count(user_id: int | BindParameter[int]) -> Select[Any]:
    """How many of the user's jobs are handed over and not ended."""
    jobs_table = JOBS
    return (
        select(func.count())
        .select_from(jobs_table)
        .where(
            jobs_table.c.user_id == user_id,
            jobs_table.c.status.in_(list(ACTIVE_STATUSES)),
            jobs_table.c.published_at.is_not(None),
        )
    )


# Handing jobs to the broker: once per job taken in (the bot) and per job ended (a worker).
_IN_FLIGHT = _in_flight_count(bindparam("user_id"))
_LOCK_USER = (
    update(USERS)
    .where(USERS.c.id == bindparam("user_id"))
    .values(display_name=USERS.c.display_name)
)
_USER_OF_JOB = select(JOBS.c.user_id).where(JOBS.c.id == bindparam("job_id"))
# Still active, not handed over yet, and a place free among the user's jobs in flight.
_CLAIM_HAND_OVER = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("job_id"),
        JOBS.c.published_at.is_(None),
        JOBS.c.status.in_(list(ACTIVE_STATUSES)),
        # (Not "user_id": an UPDATE of jobs keeps that name for its own column.)
        _in_flight_count(bindparam("owner_id")).scalar_subquery() < bindparam("limit"),
    )
    .values(published_at=bindparam("now"))
)
_HELD = (
    select(JOBS.c.id)
    .where(
        JOBS.c.user_id == bindparam("user_id"),
        JOBS.c.status.in_(list(ACTIVE_STATUSES)),
        JOBS.c.published_at.is_(None),
    )
    .order_by(JOBS.c.id)
    .limit(bindparam("free"))
)
_HAND_OVER = (
    update(JOBS)
    .where(JOBS.c.id.in_(bindparam("job_ids", expanding=True)))
    .values(published_at=bindparam("now"))
)


def _in_flight(connection: Connection, user_id: int) -> int:
    return int(connection.scalar(_IN_FLIGHT, {"user_id": user_id}) or 0)


def is_handed_over(uow: UnitOfWork, job_id: int) -> bool:
    published_at = uow.session.scalar(select(Job.published_at).where(Job.id == job_id))
    return published_at is not None


def claim_hand_over(uow: UnitOfWork, job_id: int, limit: int) -> bool:
    """Mark an accepted job handed to the broker if its user has fewer than `limit` there;
    False leaves it held (it is handed over when one of theirs ends). Commits."""
    connection = uow.connection
    user_id = connection.scalar(_USER_OF_JOB, {"job_id": job_id})
    if user_id is None:
        raise JobNotFound(job_id)
    _user_lock(connection, user_id)
    # One conditional write, under the user's lock.
    claimed = connection.execute(
        _CLAIM_HAND_OVER, {"job_id": job_id, "owner_id": user_id, "limit": limit, "now": utcnow()}
    )
    uow.commit()
    return claimed.rowcount == 1


def next_held_jobs(uow: UnitOfWork, user_id: int, limit: int) -> list[int]:
    """Hand over the user's oldest held jobs, as many as their free places allow. Commits."""
    connection = uow.connection
    _user_lock(connection, user_id)
    free = limit - _in_flight(connection, user_id)
    held = list(connection.scalars(_HELD, {"user_id": user_id, "free": free})) if free > 0 else []
    if held:
        connection.execute(_HAND_OVER, {"job_ids": held, "now": utcnow()})
    uow.commit()
    return held


def user_id_of(uow: UnitOfWork, job_id: int) -> int:
    user_id = uow.connection.scalar(_USER_OF_JOB, {"job_id": job_id})
    if user_id is None:
        raise JobNotFound(job_id)
    return int(user_id)


def handed_over_active_job_ids(uow: UnitOfWork) -> list[int]:
    """Active jobs that were handed to the broker, oldest first (to re-publish after a
    restart of the embedded broker); held ones stay held."""
    return list(
        uow.session.scalars(
            select(Job.id)
            .where(Job.status.in_(list(ACTIVE_STATUSES)), Job.published_at.is_not(None))
            .order_by(Job.id)
        )
    )


def cancel_jobs(
    uow: UnitOfWork,
    channel: str,
    chat_id: int | None,
    external_id: str,
    reason: str = "cancelled by the user",
) -> list[JobView]:
    """Cancel the user's queued and running jobs in a chat (None: in every chat), refunding
    each. Not a running job whose results are recorded (`record_results`): its worker sends
    them without looking again, so it is as good as done, and a refund would make its images
    free. (Handed back to the queue, its worker dead, it is made again: it may be cancelled.)
    Commits."""
    cancelled = []
    query = (
        select(Job)
        .join(User)
        .where(
            User.channel == channel,
            User.external_id == external_id,
            Job.status.in_(list(ACTIVE_STATUSES)),
            _UNRELEASED,
        )
        .order_by(Job.id)
    )
    if chat_id is not None:
        query = query.where(Job.chat_id == chat_id)
    for job in uow.session.scalars(query):
        if not _move(uow.session, job, JobStatus.CANCELLED, reason, unreleased=True):
            continue  # it ended meanwhile, or its results were recorded
        ledger.refund(uow.session, job.id)
        job.finished_at = utcnow()
        cancelled.append(JobView.of(job))
    uow.commit()
    return cancelled


@dataclass(frozen=True)
class RunningState:
    """What a worker looks at while a job runs."""

    status: JobStatus
    worker: str | None  # the worker that holds (or last held) it
    status_message_id: int | None  # recorded by the bot once sent, maybe after the job started


def running_state(uow: UnitOfWork, job_id: int) -> RunningState | None:
    """None when the job is gone (its user had everything about them deleted)."""
    row = uow.session.execute(
        select(Job.status, Job.worker, Job.status_message_id).where(Job.id == job_id)
    ).first()
    if row is None:
        return None
    return RunningState(JobStatus(row.status), row.worker, row.status_message_id)


def hold_again(uow: UnitOfWork, job_id: int) -> None:
    _load(uow.session, job_id).published_at = None
    uow.commit()


def users_with_held_jobs(uow: UnitOfWork) -> list[int]:
    return list(
        uow.session.scalars(
            select(Job.user_id)
            .where(Job.status.in_(list(ACTIVE_STATUSES)), Job.published_at.is_(None))
            .distinct()
        )
    )


def history_page(
    uow: UnitOfWork, channel: str, chat_id: int, external_id: str, page: int, per_page: int
) -> tuple[list[JobView], int]:
    """A page (from 1) of the user's finished jobs with images in one chat, newest first,
    and how many pages there are."""
    mine = (
        select(Job)
        .join(User)
        .where(
            User.channel == channel,
            User.external_id == external_id,
            Job.chat_id == chat_id,
            Job.status == JobStatus.DONE,
            Job.command != JobKind.PREVIEWS,
        )
    )
    total = int(uow.session.scalar(select(func.count()).select_from(mine.subquery())) or 0)
    rows = uow.session.scalars(
        mine.order_by(Job.id.desc()).offset((page - 1) * per_page).limit(per_page)
    )
    return [JobView.of(job) for job in rows], max(1, -(-total // per_page))


def block_job(
    uow: UnitOfWork,
    job_id: int,
    reason: str,
    *,
    result_paths: list[str],
    result_checksums: list[str],
    generation_seconds: float | None = None,
) -> JobView | None:
    """The content check flagged the job's images: they are not sent, its credits come back,
    and the images stay stored (for the admins' review) until retention removes them."""
    job = _load(uow.session, job_id)
    if not _move(uow.session, job, JobStatus.BLOCKED, reason):
        uow.commit()
        return None
    ledger.refund(uow.session, job_id)
    job.error = reason
    job.result_paths, job.result_checksums = result_paths, result_checksums
    job.generation_seconds = generation_seconds
    job.finished_at = utcnow()
    uow.commit()
    return JobView.of(job)


def record_result_messages(uow: UnitOfWork, job_id: int, chat_id: int, ids: list[int]) -> None:
    uow.session.add_all(
        ResultMessage(job_id=job_id, chat_id=chat_id, message_id=message_id) for message_id in ids
    )
    uow.commit()


def job_for_message(uow: UnitOfWork, chat_id: int, message_id: int) -> JobView | None:
    """The job whose result a chat message carries."""
    job_id = uow.session.scalar(
        select(ResultMessage.job_id).where(
            ResultMessage.chat_id == chat_id, ResultMessage.message_id == message_id
        )
    )
    return get_job(uow, job_id) if job_id is not None else None


def result_message_ids(uow: UnitOfWork, job_id: int) -> list[int]:
    return list(
        uow.session.scalars(select(ResultMessage.message_id).where(ResultMessage.job_id == job_id))
    )
