from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names, so that Alembic migrations name things the same on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """A person on one channel (a Telegram account, later a web account)."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("channel", "external_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str | None] = mapped_column(String(256))
    language: Mapped[str] = mapped_column(String(8), default="en")
    # Chosen from /styles; used when a request names no style.
    default_style: Mapped[str | None] = mapped_column(String(64))
    # Banned by a bot admin: their commands get one short reply and nothing else.
    banned: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Account(Base):
    """Who credits are counted for: a user or a group ("user:telegram:42"). Its row is also
    the lock that makes reserving credits atomic."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128), unique=True)
    # A group's daily credits, set by its admins (None: the group is not limited). Users
    # take the deployment's CHITRAKAR_DAILY_QUOTA.
    daily_limit: Mapped[int | None] = mapped_column(Integer)
    lock_version: Mapped[int] = mapped_column(Integer, default=0)


class LedgerEntry(Base):
    """One movement of credits, appended, never changed: a balance is their sum."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        # Each job is reserved, committed and refunded at most once per account.
        Index("ux_ledger_job_kind", "account_id", "job_id", "kind", unique=True),
        Index("ix_ledger_account_day", "account_id", "day"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # grant (+), reserve (-), commit (0: the reserve is final), refund (+ what was reserved)
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(Integer)
    # The quota day the credits count for (the reserve's day, for its refund too).
    day: Mapped[date] = mapped_column(Date)
    note: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """One request to generate images, from the chat message that asked to the delivery."""

    __tablename__ = "jobs"
    __table_args__ = (
        # Active jobs oldest first; with published_at, a job's place in the queue is counted
        # from the index alone.
        Index("ix_jobs_status_id_published_at", "status", "id", "published_at"),
        # One job per chat message or button press: a repeated update (a webhook retry, an
        # update offered twice) finds the job it already made.
        Index("ux_jobs_trigger", "channel", "chat_id", "trigger", unique=True),
        # Ids are never reused (SQLite would, after a deletion such as /forget): a worker or a
        # button holding an old id must not reach someone else's new job.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    channel: Mapped[str] = mapped_column(String(32))
    chat_id: Mapped[int] = mapped_column(BigInteger)
    chat_type: Mapped[str] = mapped_column(String(16))
    # What made the job: "message:<id>" or "button:<callback query id>".
    trigger: Mapped[str] = mapped_column(String(128))
    # The message the result replies to (the command, or the result whose button was pressed).
    request_message_id: Mapped[int | None] = mapped_column(BigInteger)
    status_message_id: Mapped[int | None] = mapped_column(BigInteger)
    language: Mapped[str] = mapped_column(String(8))

    # The JobKind: portrait, avatar, variation, upscale or previews.
    command: Mapped[str] = mapped_column(String(32))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    style: Mapped[str | None] = mapped_column(String(64))
    strength: Mapped[float | None] = mapped_column(Float)
    lora: Mapped[str | None] = mapped_column(Text)
    lora_scale: Mapped[float] = mapped_column(Float, default=1.0)
    # The image an img2img job starts from: an aligned selfie, or an earlier result.
    input_path: Mapped[str | None] = mapped_column(Text)
    parent_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    parent_index: Mapped[int | None] = mapped_column(Integer)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float] = mapped_column(Float)
    seeds: Mapped[list[int]] = mapped_column(JSON)
    # Credits reserved for the job when it was accepted.
    cost: Mapped[int] = mapped_column(Integer, default=0)
    # When the job was handed to the broker; None while held back so that one user's flood
    # does not fill the queue (at most CHITRAKAR_MAX_JOBS_IN_FLIGHT per user are handed over).
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    # Artifact keys of the results (relative: "results/42/0-1234.png") and their SHA-256.
    result_paths: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    result_checksums: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    result_file_ids: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    # When the chat accepted the result: a task redelivered after that (its worker died
    # between sending and recording the end) only records the end, and sends nothing again.
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    generation_seconds: Mapped[float | None] = mapped_column(Float)

    user: Mapped[User] = relationship()
    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan"
    )


class JobEvent(Base):
    """Every status change of a job, appended, never updated."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="events")


class AuditEvent(Base):
    """Who did what to whom, when and why: every admin action and moderation decision.
    Appended, never changed."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    channel: Mapped[str] = mapped_column(String(32))
    # Who acted ("system" for automatic moderation) and in which role.
    actor: Mapped[str] = mapped_column(String(64))
    actor_role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))
    # The user, job or chat acted on, as text ("user:42", "job:7", "chat:-100").
    target: Mapped[str | None] = mapped_column(String(128))
    chat_id: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    # Whether the action was carried out (a refused admin command is recorded too).
    allowed: Mapped[bool] = mapped_column(Boolean, default=True)


class ChatSettings(Base):
    """What a group's admins decided for their group (/settings)."""

    __tablename__ = "chat_settings"
    __table_args__ = (UniqueConstraint("channel", "chat_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    chat_id: Mapped[int] = mapped_column(BigInteger)
    # Commands and styles switched off in this chat (empty: everything allowed).
    disabled_commands: Mapped[list[str]] = mapped_column(JSON, default=list)
    disabled_styles: Mapped[list[str]] = mapped_column(JSON, default=list)
    # What happens to a flagged image here: block, spoiler or allow (None: the deployment's).
    content_policy: Mapped[str | None] = mapped_column(String(16))
    # Post every result under a spoiler (tap to reveal).
    spoilers: Mapped[bool] = mapped_column(Boolean, default=False)


class ServiceFlag(Base):
    """Switches an admin sets for the whole service: "paused" holds the message to users."""

    __tablename__ = "service_flags"

    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    set_by: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Report(Base):
    """A member's flag on a result, and the admins' decision on it."""

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    reporter: Mapped[str] = mapped_column(String(64))
    chat_id: Mapped[int] = mapped_column(BigInteger)
    # open, dismissed, deleted (the result), banned (the requester)
    status: Mapped[str] = mapped_column(String(16), default="open")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    decided_by: Mapped[str | None] = mapped_column(String(64))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ResultMessage(Base):
    """A chat message that carries a job's result, so that a reply to it (/report) finds the
    job, and a moderator can delete it."""

    __tablename__ = "result_messages"
    __table_args__ = (UniqueConstraint("chat_id", "message_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    chat_id: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[int] = mapped_column(BigInteger)


class WebAccount(Base):
    """A person who signs in to the built-in web chat. Their chat is their own: its chat id
    is the account id, and it is always a private chat."""

    __tablename__ = "web_accounts"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The name an admin invited them by (lower case; unique).
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebSignInLink(Base):
    """A one-time sign-in link. Only a hash of its secret is kept."""

    __tablename__ = "web_sign_in_links"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("web_accounts.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebSession(Base):
    """A signed-in browser. The cookie holds the secret; only its hash is kept."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("web_accounts.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Every form and request that changes something must carry it.
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebMessage(Base):
    """One message of a web chat, from the user or from the bot (whose status messages the
    worker edits as a job goes on)."""

    __tablename__ = "web_messages"
    __table_args__ = (
        Index("ix_web_messages_chat_id_id", "chat_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chat_id: Mapped[int] = mapped_column(BigInteger)
    from_bot: Mapped[bool] = mapped_column(Boolean)
    text: Mapped[str] = mapped_column(Text, default="")
    # Images shown in the message: [{"job": 42, "index": 0}] or [{"grid": "<file name>"}].
    images: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    spoiler: Mapped[bool] = mapped_column(Boolean, default=False)
    # Rows of [label, callback data]: the same buttons as under a Telegram message.
    buttons: Mapped[list[list[list[str]]]] = mapped_column(JSON, default=list)
    # A file to download: {"href": "/export", "name": "…"}.
    attachment: Mapped[dict[str, str] | None] = mapped_column(JSON(none_as_null=True))
    reply_to: Mapped[int | None] = mapped_column(BigInteger)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebChange(Base):
    """The web chats' change feed: one row per message written or edited, in order. Open
    pages follow it (server-sent events), whichever process wrote the message."""

    __tablename__ = "web_changes"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chat_id: Mapped[int] = mapped_column(BigInteger, index=True)
    message_id: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorkerHeartbeat(Base):
    """A live worker process: it writes `beat_at` every few seconds. A running job whose
    worker stopped beating is handed to another (the reconciler)."""

    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
