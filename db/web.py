"""The web chat's records: accounts, sign-in links, sessions, and the messages of each chat
with their change feed. Functions work inside the caller's unit of work; those that change
something commit.

Secrets (sign-in links, session cookies) are never stored: only their SHA-256, so a copy of
the database signs no one in.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, select, update
from sqlalchemy import text as sql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from chitrakar.domain import JobStatus
from db.models import Job, WebAccount, WebChange, WebMessage, WebSession, WebSignInLink, utcnow
from db.session import UnitOfWork

CHANNEL = "web"
# The secrets in links and cookies: 32 random bytes, URL-safe.
TOKEN_BYTES = 32


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no time zone: what it returns was written as UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class AccountView:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class SessionView:
    account: AccountView
    csrf_token: str


@dataclass(frozen=True)
class MessageView:
    id: int
    chat_id: int
    from_bot: bool
    text: str
    images: list[dict[str, Any]] = field(default_factory=list)
    spoiler: bool = False
    buttons: list[list[list[str]]] = field(default_factory=list)
    attachment: dict[str, str] | None = None
    reply_to: int | None = None
    deleted: bool = False
    created_at: datetime | None = None

    @classmethod
    def of(cls, row: WebMessage) -> MessageView:
        return cls(
            id=row.id,
            chat_id=row.chat_id,
            from_bot=row.from_bot,
            text=row.text,
            images=list(row.images or []),
            spoiler=row.spoiler,
            buttons=list(row.buttons or []),
            attachment=row.attachment,
            reply_to=row.reply_to,
            deleted=row.deleted,
            created_at=_utc(row.created_at),
        )


def _account(row: WebAccount) -> AccountView:
    return AccountView(id=row.id, name=row.name, is_admin=row.is_admin)


class NameTaken(ValueError):
    pass


def ensure_account(uow: UnitOfWork, name: str, is_admin: bool) -> AccountView:
    """The account of that name, made if there is none; an existing one becomes an admin when
    asked (never less of one: that is a deliberate act, not a side effect of an invite)."""
    name = name.strip().lower()
    row = uow.session.scalar(select(WebAccount).where(WebAccount.name == name))
    if row is None:
        row = WebAccount(name=name, is_admin=is_admin)
        uow.session.add(row)
        try:
            uow.session.flush()
        except IntegrityError:
            # Made at the same moment by another process.
            uow.session.rollback()
            row = uow.session.scalars(select(WebAccount).where(WebAccount.name == name)).one()
    elif is_admin and not row.is_admin:
        row.is_admin = True
    uow.commit()
    return _account(row)


def accounts(uow: UnitOfWork) -> list[AccountView]:
    return [
        _account(row) for row in uow.session.scalars(select(WebAccount).order_by(WebAccount.id))
    ]


def account(uow: UnitOfWork, account_id: int) -> AccountView | None:
    row = uow.session.get(WebAccount, account_id)
    return _account(row) if row is not None else None


def issue_sign_in_link(uow: UnitOfWork, account_id: int, valid_for: timedelta) -> str:
    """A new one-time sign-in secret for the account; returned once, stored as a hash."""
    token = new_token()
    uow.session.add(
        WebSignInLink(
            account_id=account_id,
            token_hash=token_hash(token),
            expires_at=utcnow() + valid_for,
        )
    )
    uow.commit()
    return token


def redeem_sign_in_link(
    uow: UnitOfWork, token: str, session_lasts: timedelta
) -> tuple[AccountView, str] | None:
    """Use a sign-in link (once, before it expires): a new session's secret for the cookie,
    or None for an unknown, used or expired link."""
    now = utcnow()
    # One conditional UPDATE: two browsers racing with the same link cannot both win.
    used = uow.session.execute(
        update(WebSignInLink)
        .where(
            WebSignInLink.token_hash == token_hash(token),
            WebSignInLink.used_at.is_(None),
            WebSignInLink.expires_at > now,
        )
        .values(used_at=now)
        .returning(WebSignInLink.account_id)
    ).first()
    if used is None:
        return None
    row = uow.session.get(WebAccount, used.account_id)
    if row is None:
        return None
    secret = new_token()
    uow.session.add(
        WebSession(
            account_id=row.id,
            token_hash=token_hash(secret),
            csrf_token=new_token(),
            expires_at=now + session_lasts,
        )
    )
    uow.commit()
    return _account(row), secret


def session_of(uow: UnitOfWork, secret: str) -> SessionView | None:
    row = uow.session.scalar(select(WebSession).where(WebSession.token_hash == token_hash(secret)))
    if row is None or _utc(row.expires_at) <= utcnow():
        return None
    owner = uow.session.get(WebAccount, row.account_id)
    if owner is None:
        return None
    return SessionView(account=_account(owner), csrf_token=row.csrf_token)


def end_session(uow: UnitOfWork, secret: str) -> None:
    uow.session.execute(delete(WebSession).where(WebSession.token_hash == token_hash(secret)))
    uow.commit()


def revoke(uow: UnitOfWork, name: str) -> AccountView | None:
    """Sign an account out everywhere and void its unused links (a lost phone); None when
    there is no such account."""
    row = uow.session.scalar(select(WebAccount).where(WebAccount.name == name.strip().lower()))
    if row is None:
        return None
    uow.session.execute(delete(WebSession).where(WebSession.account_id == row.id))
    uow.session.execute(delete(WebSignInLink).where(WebSignInLink.account_id == row.id))
    uow.commit()
    return _account(row)


def signed_in_somewhere(uow: UnitOfWork, account_id: int) -> bool:
    return (
        uow.session.scalar(
            select(WebSession.id).where(
                WebSession.account_id == account_id, WebSession.expires_at > utcnow()
            )
        )
        is not None
    )


def end_expired(uow: UnitOfWork, now: datetime) -> int:
    """Delete expired sessions and sign-in links (the retention sweep)."""
    sessions = uow.session.execute(delete(WebSession).where(WebSession.expires_at <= now))
    links = uow.session.execute(delete(WebSignInLink).where(WebSignInLink.expires_at <= now))
    uow.commit()
    return int(sessions.rowcount or 0) + int(links.rowcount or 0)  # type: ignore[attr-defined]


# PostgreSQL advisory lock namespace for a chat's change feed ("WEBC").
_FEED_LOCK = 0x57454243


# The message id of a change that says "the whole chat was deleted" (/forget): open pages
# start again from nothing. Messages' ids start at 1.
CLEARED = 0


def _changed(session: Session, chat_id: int, message_id: int) -> None:
    """Append to the chat's feed. A page reads its chat's changes after the last id it saw,
    so ids must become visible in order within a chat: on PostgreSQL, where a later id can
    commit first, writers of one chat take turns until commit (SQLite has one writer)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            sql("SELECT pg_advisory_xact_lock(:space, :chat)"),
            {"space": _FEED_LOCK, "chat": chat_id},
        )
    session.add(WebChange(chat_id=chat_id, message_id=message_id))


def post(
    uow: UnitOfWork,
    chat_id: int,
    *,
    from_bot: bool,
    text: str,
    images: list[dict[str, Any]] | None = None,
    spoiler: bool = False,
    buttons: list[list[list[str]]] | None = None,
    attachment: dict[str, str] | None = None,
    reply_to: int | None = None,
) -> int:
    """Add a message to a chat; the open pages of that chat get it from the change feed."""
    row = WebMessage(
        chat_id=chat_id,
        from_bot=from_bot,
        text=text,
        images=images or [],
        spoiler=spoiler,
        buttons=buttons or [],
        attachment=attachment,
        reply_to=reply_to,
    )
    uow.session.add(row)
    uow.session.flush()
    _changed(uow.session, chat_id, row.id)
    uow.commit()
    return row.id


# What an edit may leave unchanged.
KEEP: Any = object()


def edit(
    uow: UnitOfWork,
    chat_id: int,
    message_id: int,
    *,
    text: str = KEEP,
    buttons: list[list[list[str]]] = KEEP,
    deleted: bool = KEEP,
    while_running: int | None = None,
) -> bool:
    """Change a message of this chat; False when there is no such message (deleted by /forget,
    or not this chat's: an id from elsewhere changes nothing), or when `while_running` names
    a job that no longer runs (a late progress edit must not cover "Cancelled.")."""
    values: dict[str, Any] = {}
    if text is not KEEP:
        values["text"] = text
    if buttons is not KEEP:
        values["buttons"] = buttons
    if deleted is not KEEP:
        values["deleted"] = deleted
    query = update(WebMessage).where(WebMessage.id == message_id, WebMessage.chat_id == chat_id)
    if while_running is not None:
        # One statement: the job's status is read as the row is written.
        query = query.where(
            exists().where(Job.id == while_running, Job.status == JobStatus.RUNNING)
        )
    changed = uow.session.execute(query.values(**values)).rowcount  # type: ignore[attr-defined]
    if changed != 1:
        return False
    _changed(uow.session, chat_id, message_id)
    uow.commit()
    return True


def recent_messages(uow: UnitOfWork, chat_id: int, limit: int) -> list[MessageView]:
    """The chat's last messages that are still shown, oldest first."""
    rows = uow.session.scalars(
        select(WebMessage)
        .where(WebMessage.chat_id == chat_id, WebMessage.deleted.is_(False))
        .order_by(WebMessage.id.desc())
        .limit(limit)
    )
    return [MessageView.of(row) for row in reversed(list(rows))]


def messages(uow: UnitOfWork, chat_id: int, ids: list[int]) -> list[MessageView]:
    if not ids:
        return []
    rows = uow.session.scalars(
        select(WebMessage).where(WebMessage.chat_id == chat_id, WebMessage.id.in_(ids))
    )
    return sorted((MessageView.of(row) for row in rows), key=lambda m: m.id)


def last_change_id(uow: UnitOfWork, chat_id: int | None = None) -> int:
    """The last change of a chat (what a page opening it has seen), or of all chats."""
    query = select(WebChange.id).order_by(WebChange.id.desc()).limit(1)
    if chat_id is not None:
        query = query.where(WebChange.chat_id == chat_id)
    return uow.session.scalar(query) or 0


def changes_after(
    uow: UnitOfWork, after: int, chat_id: int | None = None, limit: int = 1000
) -> list[tuple[int, int, int]]:
    """(change id, chat id, message id) of the changes after `after`, in order; of one chat,
    or of all (the web server's one poller)."""
    query = select(WebChange.id, WebChange.chat_id, WebChange.message_id).where(
        WebChange.id > after
    )
    if chat_id is not None:
        query = query.where(WebChange.chat_id == chat_id)
    rows = uow.session.execute(query.order_by(WebChange.id).limit(limit))
    return [(row.id, row.chat_id, row.message_id) for row in rows]


def chat_of(external_id: str) -> int | None:
    """The web chat of a web user (their account id is their chat's id)."""
    return int(external_id) if external_id.isdecimal() else None


def transcript(session: Session, chat_id: int) -> list[dict[str, Any]]:
    """Every message of a chat as JSON-ready values, oldest first (/export)."""
    rows = session.scalars(
        select(WebMessage).where(WebMessage.chat_id == chat_id).order_by(WebMessage.id)
    )
    return [
        {
            "id": row.id,
            "from": "bot" if row.from_bot else "you",
            "text": row.text,
            "images": row.images,
            "deleted": row.deleted,
            "at": _utc(row.created_at).isoformat(),
        }
        for row in rows
    ]


def forget_chat(session: Session, chat_id: int) -> int:
    """Delete a chat's messages and their changes (/forget), leaving one change that tells
    the chat's open pages (other tabs, other devices) to drop what they show; the caller
    commits."""
    session.execute(delete(WebChange).where(WebChange.chat_id == chat_id))
    result = session.execute(delete(WebMessage).where(WebMessage.chat_id == chat_id))
    _changed(session, chat_id, CLEARED)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def prune_changes(uow: UnitOfWork, before: datetime) -> None:
    """The feed only has to reach pages that are open: old changes go (retention sweep)."""
    uow.session.execute(delete(WebChange).where(WebChange.at < before))
    uow.commit()


def forget_messages_before(uow: UnitOfWork, before: datetime) -> int:
    """Delete the messages written before `before` (retention sweep); how many."""
    old = select(WebMessage.id).where(WebMessage.created_at < before)
    uow.session.execute(delete(WebChange).where(WebChange.message_id.in_(old)))
    result = uow.session.execute(delete(WebMessage).where(WebMessage.created_at < before))
    uow.commit()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
