"""Moderation and admin records: the audit log, bans, service flags, group settings and
reports on results. Every function takes a unit of work; those that change something commit.

Changes that could race (two admins at once, a report tapped twice) are atomic on SQLite and
PostgreSQL alike: rows are created with an insert-if-absent, and a read-modify-write first
takes the row's lock (PostgreSQL) or the database's write lock (SQLite).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final, cast

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.engine import CursorResult

from chitrakar.quota import group_account
from db.models import (
    Account,
    AuditEvent,
    ChatSettings,
    Job,
    Report,
    ServiceFlag,
    User,
    utcnow,
)
from db.session import UnitOfWork, dialect_insert

# What happens to a flagged image in a chat (ChatSettings.content_policy).
CONTENT_POLICIES: Final = frozenset({"block", "spoiler", "allow"})
# A report is open until an admin decides it one of these ways.
REPORT_OPEN: Final = "open"
REPORT_DECISIONS: Final = frozenset({"dismissed", "deleted", "banned"})


def _as_utc(moment: datetime) -> datetime:
    # SQLite keeps no time zone: what it returns was written as UTC.
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


# The audit log.


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    channel: str
    actor: str
    actor_role: str
    action: str
    target: str | None
    chat_id: int | None
    reason: str | None
    detail: dict[str, Any] | None
    allowed: bool

    @classmethod
    def of(cls, event: AuditEvent) -> AuditEntry:
        return cls(
            id=event.id,
            at=_as_utc(event.at),
            channel=event.channel,
            actor=event.actor,
            actor_role=event.actor_role,
            action=event.action,
            target=event.target,
            chat_id=event.chat_id,
            reason=event.reason,
            detail=dict(event.detail) if event.detail is not None else None,
            allowed=bool(event.allowed),
        )


def record(
    uow: UnitOfWork,
    *,
    channel: str,
    actor: str,
    actor_role: str,
    action: str,
    target: str | None = None,
    chat_id: int | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
    allowed: bool = True,
) -> int:
    """Append an event to the audit log; returns its id. Commits (with whatever else the
    unit of work holds, so an action and its record can be made durable together)."""
    event = AuditEvent(
        at=utcnow(),
        channel=channel,
        actor=actor,
        actor_role=actor_role,
        action=action,
        target=target,
        chat_id=chat_id,
        reason=reason,
        detail=detail,
        allowed=allowed,
    )
    uow.session.add(event)
    uow.session.flush()
    event_id = event.id
    uow.commit()
    return event_id


def latest(uow: UnitOfWork, limit: int = 20, channel: str | None = None) -> list[AuditEntry]:
    """The newest events first, of one channel or of all."""
    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    if channel is not None:
        query = query.where(AuditEvent.channel == channel)
    return [AuditEntry.of(event) for event in uow.session.scalars(query)]


def count_by_action(uow: UnitOfWork, since: datetime) -> dict[str, int]:
    """How many events of each action (allowed or refused) were recorded since `since`;
    actions without any are absent."""
    rows = uow.session.execute(
        select(AuditEvent.action, func.count())
        .where(AuditEvent.at >= _as_utc(since))
        .group_by(AuditEvent.action)
    )
    return {action: int(count) for action, count in rows}


# Bans.


def set_banned(uow: UnitOfWork, channel: str, external_id: str, banned: bool) -> None:
    """Ban or unban a user, creating their row if they never wrote to the bot. Commits."""
    session = uow.session
    session.execute(
        dialect_insert(session, User)
        .values(
            channel=channel,
            external_id=external_id,
            language="en",
            banned=banned,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["channel", "external_id"])
    )
    session.execute(
        update(User)
        .where(User.channel == channel, User.external_id == external_id)
        .values(banned=banned)
    )
    uow.commit()


# The reads of every command, built once: building a statement costs more than running it.
_USERS, _FLAGS, _CHATS = User.__table__.c, ServiceFlag.__table__.c, ChatSettings.__table__.c
_BANNED = select(_USERS.banned).where(
    _USERS.channel == bindparam("channel"), _USERS.external_id == bindparam("external_id")
)
_BANNED_AMONG = select(_USERS.external_id).where(
    _USERS.channel == bindparam("channel"),
    _USERS.external_id.in_(bindparam("external_ids", expanding=True)),
    _USERS.banned.is_(True),
)
_FLAG = select(_FLAGS.value).where(_FLAGS.key == bindparam("key"))
_CHAT_SETTINGS = select(
    _CHATS.disabled_commands, _CHATS.disabled_styles, _CHATS.content_policy, _CHATS.spoilers
).where(_CHATS.channel == bindparam("channel"), _CHATS.chat_id == bindparam("chat_id"))
_SETTINGS_OF_CHATS = select(
    _CHATS.chat_id,
    _CHATS.disabled_commands,
    _CHATS.disabled_styles,
    _CHATS.content_policy,
    _CHATS.spoilers,
).where(
    _CHATS.channel == bindparam("channel"),
    _CHATS.chat_id.in_(bindparam("chat_ids", expanding=True)),
)


def is_banned(uow: UnitOfWork, channel: str, external_id: str) -> bool:
    banned = uow.connection.scalar(_BANNED, {"channel": channel, "external_id": external_id})
    return bool(banned)


def banned_among(uow: UnitOfWork, channel: str, external_ids: Collection[str]) -> set[str]:
    """Which of these users are banned, in one statement."""
    found = uow.connection.scalars(
        _BANNED_AMONG, {"channel": channel, "external_ids": external_ids}
    )
    return set(found)


# Service flags.


def set_flag(uow: UnitOfWork, key: str, value: str | None, set_by: str) -> None:
    """Set a service-wide switch ("paused": the message shown to users); None removes it.
    Commits."""
    session = uow.session
    if value is None:
        session.execute(delete(ServiceFlag).where(ServiceFlag.key == key))
    else:
        at = utcnow()
        session.execute(
            dialect_insert(session, ServiceFlag)
            .values(key=key, value=value, set_by=set_by, at=at)
            .on_conflict_do_update(
                index_elements=["key"], set_={"value": value, "set_by": set_by, "at": at}
            )
        )
    uow.commit()


def get_flag(uow: UnitOfWork, key: str) -> str | None:
    return uow.connection.scalar(_FLAG, {"key": key})


# Group settings.


@dataclass(frozen=True)
class ChatSettingsView:
    """What a chat's admins decided; the defaults where they decided nothing."""

    disabled_commands: frozenset[str] = frozenset()
    disabled_styles: frozenset[str] = frozenset()
    # block, spoiler or allow; None: the deployment's policy.
    content_policy: str | None = None
    spoilers: bool = False

    @classmethod
    def of(cls, row: Any) -> ChatSettingsView:
        """From a `ChatSettings`, or a row with its columns."""
        return cls(
            disabled_commands=frozenset(row.disabled_commands or ()),
            disabled_styles=frozenset(row.disabled_styles or ()),
            content_policy=row.content_policy,
            spoilers=bool(row.spoilers),
        )


class _Unset(Enum):
    UNSET = "unset"


# update_chat_settings(content_policy=UNSET) leaves the policy as it is (None resets it).
UNSET: Final = _Unset.UNSET


def chat_settings(uow: UnitOfWork, channel: str, chat_id: int) -> ChatSettingsView:
    row = uow.connection.execute(_CHAT_SETTINGS, {"channel": channel, "chat_id": chat_id}).first()
    return ChatSettingsView.of(row) if row is not None else ChatSettingsView()


def settings_of_chats(
    uow: UnitOfWork, channel: str, chat_ids: Collection[int]
) -> dict[int, ChatSettingsView]:
    """`chat_settings` of each chat, in one statement."""
    found = uow.connection.execute(_SETTINGS_OF_CHATS, {"channel": channel, "chat_ids": chat_ids})
    decided = {row.chat_id: ChatSettingsView.of(row) for row in found}
    return {chat_id: decided.get(chat_id, ChatSettingsView()) for chat_id in chat_ids}


def _switched(disabled: list[str] | None, item: str, on: bool) -> list[str]:
    """A list of what is switched off, with `item` switched on or off."""
    current = set(disabled or ())
    if on:
        current.discard(item)
    else:
        current.add(item)
    return sorted(current)


def update_chat_settings(
    uow: UnitOfWork,
    channel: str,
    chat_id: int,
    *,
    command: tuple[str, bool] | None = None,
    style: tuple[str, bool] | None = None,
    content_policy: str | _Unset | None = UNSET,
    spoilers: bool | None = None,
) -> ChatSettingsView:
    """Change a chat's settings: `command` and `style` switch one on (True) or off (False),
    whatever it was; content_policy None goes back to the deployment's (UNSET: unchanged);
    spoilers None: unchanged. Returns the settings as they now are. Commits. Raises
    ValueError for a content policy other than block, spoiler or allow."""
    if isinstance(content_policy, str) and content_policy not in CONTENT_POLICIES:
        raise ValueError(f"unknown content policy {content_policy!r}")
    session = uow.session
    # On SQLite this write takes the database's write lock for the whole read-modify-write.
    session.execute(
        dialect_insert(session, ChatSettings)
        .values(
            channel=channel,
            chat_id=chat_id,
            disabled_commands=[],
            disabled_styles=[],
            content_policy=None,
            spoilers=False,
        )
        .on_conflict_do_nothing(index_elements=["channel", "chat_id"])
    )
    row = session.scalars(
        select(ChatSettings)
        .where(ChatSettings.channel == channel, ChatSettings.chat_id == chat_id)
        .with_for_update()
        # The row may be in the session from an earlier read: read it again, under the lock.
        .execution_options(populate_existing=True)
    ).one()
    if command is not None:
        row.disabled_commands = _switched(row.disabled_commands, *command)
    if style is not None:
        row.disabled_styles = _switched(row.disabled_styles, *style)
    if not isinstance(content_policy, _Unset):
        row.content_policy = content_policy
    if spoilers is not None:
        row.spoilers = spoilers
    view = ChatSettingsView.of(row)
    uow.commit()
    return view


# Reports on results.


@dataclass(frozen=True)
class ReportView:
    id: int
    job_id: int
    reporter: str
    chat_id: int
    # open, dismissed, deleted or banned
    status: str
    at: datetime
    decided_by: str | None = None
    decided_at: datetime | None = None

    @classmethod
    def of(cls, report: Report) -> ReportView:
        return cls(
            id=report.id,
            job_id=report.job_id,
            reporter=report.reporter,
            chat_id=report.chat_id,
            status=report.status,
            at=_as_utc(report.at),
            decided_by=report.decided_by,
            decided_at=_as_utc(report.decided_at) if report.decided_at else None,
        )


@dataclass(frozen=True)
class OpenedReport:
    id: int
    # False: the reporter's report on the job, still open, found again (its admins told).
    created: bool


def move_chat(uow: UnitOfWork, channel: str, old_chat_id: int, new_chat_id: int) -> bool:
    """A group became a supergroup (Telegram gives it a new id): its settings and its
    account (its admins' daily limit and the credits used today) go with it, unless the new
    chat has its own already. Whether anything moved. Commits."""
    moved = False
    settings_of_new = select(ChatSettings.id).where(
        ChatSettings.channel == channel, ChatSettings.chat_id == new_chat_id
    )
    if uow.session.scalar(settings_of_new) is None:
        settings = cast(
            CursorResult[Any],
            uow.session.execute(
                update(ChatSettings)
                .where(ChatSettings.channel == channel, ChatSettings.chat_id == old_chat_id)
                .values(chat_id=new_chat_id)
            ),
        )
        moved = settings.rowcount == 1
    old_key, new_key = group_account(channel, old_chat_id), group_account(channel, new_chat_id)
    if uow.session.scalar(select(Account.id).where(Account.key == new_key)) is None:
        account = cast(
            CursorResult[Any],
            uow.session.execute(update(Account).where(Account.key == old_key).values(key=new_key)),
        )
        moved = moved or account.rowcount == 1
    uow.commit()
    return moved


def open_report(uow: UnitOfWork, job_id: int, reporter: str, chat_id: int) -> OpenedReport | None:
    """Record a member's report on a job's result; None when the job does not exist. A
    reporter's report on a job that is still open is returned again rather than made twice
    (a decided one is not: a new report opens). Commits."""
    session = uow.session
    # Locks the job's row (PostgreSQL) or takes the write lock (SQLite), so two taps at once
    # find one another's report rather than both adding one.
    locked = cast(
        CursorResult[Any],
        session.execute(update(Job).where(Job.id == job_id).values(status=Job.status)),
    )
    if locked.rowcount != 1:
        uow.commit()
        return None
    existing = session.scalar(
        select(Report.id)
        .where(Report.job_id == job_id, Report.reporter == reporter, Report.status == REPORT_OPEN)
        .order_by(Report.id)
        .limit(1)
    )
    if existing is not None:
        uow.commit()
        return OpenedReport(existing, created=False)
    report = Report(
        job_id=job_id, reporter=reporter, chat_id=chat_id, status=REPORT_OPEN, at=utcnow()
    )
    session.add(report)
    session.flush()
    report_id = report.id
    uow.commit()
    return OpenedReport(report_id, created=True)


def decide_report(
    uow: UnitOfWork, report_id: int, status: str, decided_by: str
) -> ReportView | None:
    """Close an open report as dismissed, deleted (the result) or banned (the requester).
    None when there is no such report or it was already decided (by another admin, maybe at
    the same moment: exactly one decision wins). Commits. Raises ValueError for another
    status."""
    if status not in REPORT_DECISIONS:
        raise ValueError(f"unknown report decision {status!r}")
    session = uow.session
    decided = cast(
        CursorResult[Any],
        session.execute(
            update(Report)
            .where(Report.id == report_id, Report.status == REPORT_OPEN)
            .values(status=status, decided_by=decided_by, decided_at=utcnow())
        ),
    )
    if decided.rowcount != 1:
        uow.commit()
        return None
    report = session.scalars(
        select(Report).where(Report.id == report_id).execution_options(populate_existing=True)
    ).one()
    view = ReportView.of(report)
    uow.commit()
    return view


def reopen_report(uow: UnitOfWork, report_id: int, status: str) -> None:
    """Undo `decide_report`'s `status` when what it decided could not be carried out (the
    result's files are still stored): the report is open for the next decision. Commits."""
    uow.session.execute(
        update(Report)
        .where(Report.id == report_id, Report.status == status)
        .values(status=REPORT_OPEN, decided_by=None, decided_at=None)
    )
    uow.commit()


def get_report(uow: UnitOfWork, report_id: int) -> ReportView | None:
    report = uow.session.scalars(
        select(Report).where(Report.id == report_id).execution_options(populate_existing=True)
    ).one_or_none()
    return ReportView.of(report) if report is not None else None
