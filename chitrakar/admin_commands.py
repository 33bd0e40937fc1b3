"""A bot admin's commands, for every chat channel: the arguments a channel found (the target
user, the words after it) become a moderation call and the sentence that says what was done.
A refusal or bad input is raised as CommandError for the channel to say. Blocking (database);
channels run it in a thread."""

from __future__ import annotations

from chitrakar import replies
from chitrakar.config import Settings
from chitrakar.domain import Command, CommandError
from chitrakar.moderation import Actor, Moderation
from chitrakar.permissions import Permission
from chitrakar.services import JobIntake
from chitrakar.texts import text

ADMIN_COMMANDS = frozenset(
    {
        Command.BAN,
        Command.UNBAN,
        Command.GRANT,
        Command.SET_QUOTA,
        Command.STATS,
        Command.QUEUE,
        Command.PAUSE,
        Command.RESUME,
        Command.AUDIT,
    }
)


def admin_reply(
    command: Command,
    actor: Actor,
    language: str,
    target: str | None,
    rest: list[str],
    words: str,
    *,
    author_unknown: bool = False,
    target_ambiguous: bool = False,
    moderation: Moderation,
    intake: JobIntake,
    settings: Settings,
) -> str:
    """`target` and `rest`: the user the command is about and its arguments
    (`replies.admin_target`); `words`: everything after the command (a /pause message);
    `author_unknown`: it replies to a message sent on behalf of a chat, which names no user;
    `target_ambiguous`: it replies to one user's message and gives another's id first
    (`replies.ambiguous_target`)."""

    def usage(permission: Permission, action: str, key: str) -> str:
        moderation.check(actor, permission, action)
        if target_ambiguous and not target:
            return text(language, "admin.target_ambiguous")
        # "Reply to their message" is what the admin did: say why that found no one.
        return text(language, "admin.author_unknown" if author_unknown and not target else key)

    if command in (Command.BAN, Command.UNBAN):
        banned = command == Command.BAN
        if target is None:
            return usage(Permission.BAN, "ban", "admin.usage_ban")
        moderation.ban(actor, target, banned, " ".join(rest) or None)
        return text(language, "admin.banned" if banned else "admin.unbanned", user=target)
    if command == Command.GRANT:
        if target is None or len(rest) != 1 or not rest[0].isdecimal():
            return usage(Permission.GRANT, "grant", "admin.usage_grant")
        moderation.grant(actor, target, int(rest[0]))
        return text(language, "admin.granted", user=target, credits=int(rest[0]))
    if command == Command.SET_QUOTA:
        valid = len(rest) == 1 and (rest[0].isdecimal() or rest[0].lower() == "default")
        if target is None or not valid:
            return usage(Permission.SET_QUOTA, "set_quota", "admin.usage_setquota")
        credits = None if rest[0].lower() == "default" else int(rest[0])
        moderation.set_quota(actor, target, credits)
        if credits is None:
            return text(language, "admin.quota_reset", user=target)
        return text(language, "admin.quota_set", user=target, credits=credits)
    if command == Command.STATS:
        figures, events = moderation.stats(actor)
        return replies.stats_reply(language, figures, events, settings.timezone)
    if command == Command.QUEUE:
        return replies.queue_reply(language, moderation.queue(actor))
    if command == Command.PAUSE:
        # A bare /pause stores no notice: each user is told in their own language.
        moderation.pause(actor, words)
        return text(
            language, "admin.paused", notice=words or text(language, "service.paused_default")
        )
    if command == Command.RESUME:
        moderation.pause(actor, None)
        intake.hand_over_all_held()
        return text(language, "admin.resumed")
    if command == Command.AUDIT:
        return replies.audit_reply(language, moderation.audit_log(actor), settings.zone)
    raise CommandError("admin.not_allowed")  # not an admin command: nothing to run
