"""What the bot says, composed from the text catalogue.

Plain Python with no I/O, shared by every chat channel, so that each says exactly the same:
a channel fetches the figures, calls one of these, and sends the text (and buttons) its own way.
"""

from __future__ import annotations

from datetime import tzinfo

from chitrakar.buttons import Button, history_buttons, repeatable
from chitrakar.config import Settings
from chitrakar.domain import Command, CommandError, JobKind, option_limits
from chitrakar.quota import STEPS_INCLUDED
from chitrakar.services import QuotaStatus
from chitrakar.styles import StyleCatalogue
from chitrakar.texts import text
from db.audit import AuditEntry
from db.jobs import JobView
from db.stats import QueueEntry, Stats

# What a history line calls each kind of job.
KIND_NAMES = {
    JobKind.PORTRAIT: "history.kind_portrait",
    JobKind.AVATAR: "history.kind_avatar",
    JobKind.VARIATION: "history.kind_variation",
    JobKind.UPSCALE: "history.kind_upscale",
    JobKind.PREVIEWS: "history.kind_previews",
}
# How much of a prompt a history line shows.
HISTORY_PROMPT_CHARS = 60
# How much of an audit event's reason a line shows.
AUDIT_REASON_CHARS = 80


def usage(language: str, default_steps: int, command: Command = Command.PORTRAIT) -> str:
    key = "usage.avatar" if command == Command.AVATAR else "usage.portrait"
    return text(language, key, default_steps=default_steps, **option_limits())


def command_error(language: str, default_steps: int, command: Command, exc: CommandError) -> str:
    """A refused command; a malformed one (an `error.*` key) also shows how to write it."""
    reply = text(language, exc.key, **exc.params)
    if exc.key.startswith("error."):
        reply += "\n\n" + usage(language, default_steps, command)
    return reply


def quota_reply(language: str, status: QuotaStatus, timezone: str) -> str:
    """Credits left today, what things cost, and when the day turns."""
    reply = text(
        language,
        "quota.status" if status.fixed_steps is None else "quota.status_fixed_steps",
        left=status.user_left,
        limit=status.user_limit,
        resets=f"{status.resets_at:%H:%M} {timezone}",
        steps_included=STEPS_INCLUDED,
        steps=status.fixed_steps,
    )
    if status.group_left is not None:
        reply += "\n\n" + text(
            language, "quota.group_status", left=status.group_left, limit=status.group_limit
        )
    return reply


def history_reply(
    language: str, past: list[JobView], page: int, pages: int, zone: tzinfo, owner: str
) -> tuple[str, list[list[Button]] | None]:
    """One page of past jobs, newest first, and the buttons under it (None: no buttons)."""
    if not past:
        return text(language, "history.empty"), None
    lines = [
        text(
            language,
            "history.line",
            number=n,
            when=f"{job.created_at.astimezone(zone):%d %b %H:%M}",
            what=text(language, KIND_NAMES[job.kind]),
            prompt=_shown_prompt(job.plan.prompt),
        )
        for n, job in enumerate(past, start=1)
    ]
    reply = text(language, "history.header", page=page, pages=pages) + "\n\n" + "\n".join(lines)
    entries = [
        (job.id, repeatable(job.kind, len(job.plan.seeds), job.input_path is not None))
        for job in past
    ]
    return reply, history_buttons(owner, entries, page, pages)


def _shown_prompt(prompt: str) -> str:
    return (
        prompt if len(prompt) <= HISTORY_PROMPT_CHARS else prompt[: HISTORY_PROMPT_CHARS - 1] + "…"
    )


def privacy_reply(language: str, settings: Settings) -> str:
    hours = settings.input_retention_hours
    input_rule = (
        text(language, "privacy.input_after", hours=f"{hours:g}")
        if hours > 0
        else text(language, "privacy.input_at_end")
    )
    return text(
        language,
        "privacy.text",
        daily_quota=settings.daily_quota,
        retention_days=f"{settings.retention_days:g}",
        input_rule=input_rule,
    )


def styles_listing(language: str, catalogue: StyleCatalogue, max_length: int) -> str:
    """The catalogue as text, for when its preview grid is not made yet."""
    lines = [
        text(
            language,
            "styles.line",
            name=style.name_in(language),
            code=style.key,
            description=style.description_in(language),
        )
        for style in catalogue.styles.values()
    ]
    listing = text(language, "styles.list", lines="\n".join(lines))
    while len(listing) > max_length:
        # A long catalogue (a deployment's own styles): the buttons still show every style.
        lines = [*lines[:-2], "…"]
        listing = text(language, "styles.list", lines="\n".join(lines))
    return listing


def cancel_reply(language: str, cancelled: list[JobView]) -> str:
    return text(
        language, "cancel.done", count=len(cancelled), credits=sum(j.cost for j in cancelled)
    )


def stats_reply(language: str, figures: Stats, events: dict[str, int], timezone: str) -> str:
    none = text(language, "admin.none_value")

    def seconds(value: float | None) -> str:
        return none if value is None else text(language, "admin.seconds", value=value)

    by_status = ", ".join(f"{status} {n}" for status, n in figures.jobs_by_status.items() if n)
    top = ", ".join(f"{name or uid} {n}" for uid, name, n in figures.top_users) or none
    return text(
        language,
        "admin.stats",
        zone=timezone,
        by_status=by_status or "0",
        images=figures.images,
        gpu_seconds=figures.gpu_seconds,
        blocked=figures.blocked,
        queue=figures.queue_length,
        held=figures.held,
        wait_median=seconds(figures.wait_median_s),
        wait_p95=seconds(figures.wait_p95_s),
        gen_median=seconds(figures.generation_median_s),
        gen_p95=seconds(figures.generation_p95_s),
        top=top,
        events=", ".join(f"{action} {n}" for action, n in sorted(events.items())) or none,
    )


def queue_reply(language: str, entries: list[QueueEntry]) -> str:
    if not entries:
        return text(language, "admin.queue_empty")
    lines = [
        text(
            language,
            "admin.queue_line",
            job=entry.id,
            status=entry.status,
            held=text(language, "admin.held_mark") if entry.held else "",
            command=entry.command,
            user=entry.display_name or entry.external_id,
            chat=entry.chat_id,
        )
        for entry in entries
    ]
    return "\n".join([text(language, "admin.queue_header"), *lines])


def audit_reply(language: str, events: list[AuditEntry], zone: tzinfo) -> str:
    if not events:
        return text(language, "admin.audit_empty")
    lines = [
        text(
            language,
            "admin.audit_line",
            when=f"{event.at.astimezone(zone):%d %b %H:%M}",
            actor=event.actor,
            role=event.actor_role,
            action=event.action,
            refused="" if event.allowed else text(language, "admin.refused_mark"),
            target=event.target or "",
            reason=(event.reason or "")[:AUDIT_REASON_CHARS],
        )
        for event in events
    ]
    return "\n".join([text(language, "admin.audit_header"), *lines])


# A Telegram user id has at least this many digits; a shorter number is an argument (credits,
# a reason), even as the first word.
USER_ID_MIN_DIGITS = 5
# Telegram's user ids are 64-bit integers: at most 20 digits.
USER_ID_MAX_DIGITS = 20


def user_id_in(word: str) -> str | None:
    """The user id a word gives, as ids are stored (no leading zeros), or None. ASCII digits
    only: `str.isdecimal` also takes Devanagari and full-width digits, and such a word, kept
    as it is, named a user who does not exist (a ban or a grant that reached no one)."""
    if word.isascii() and word.isdigit() and len(word) <= USER_ID_MAX_DIGITS:
        return str(int(word))
    return None


def _names_author(word: str, replied_author: str) -> bool:
    named = user_id_in(word)
    return named is not None and named == user_id_in(replied_author)


def ambiguous_target(words: list[str], replied_author: str | None) -> bool:
    """Whether a command sent as a reply gives, first, another user's id: which of the two it
    is about cannot be told, so it names no one (`admin_target`)."""
    return (
        replied_author is not None
        and bool(words)
        and user_id_in(words[0]) is not None
        and len(words[0]) >= USER_ID_MIN_DIGITS
        and not _names_author(words[0], replied_author)
    )


def admin_target(
    words: list[str], replied_author: str | None = None
) -> tuple[str | None, list[str]]:
    """The user an admin command is about, and its arguments: the author of the message it
    replies to, with every word an argument (`/grant 20` as a reply) but a first word that
    is the author's id (said twice); none when that first word is another user's id
    (`ambiguous_target`); else the id its first word gives, and the words after it;
    (None, words) when it names none."""
    if replied_author is not None:
        if words and _names_author(words[0], replied_author):
            return replied_author, words[1:]
        if ambiguous_target(words, replied_author):
            return None, words
        return replied_author, words
    named = user_id_in(words[0]) if words else None
    if named is not None:
        return named, words[1:]
    return None, words
