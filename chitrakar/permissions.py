"""Who may do what: every permission is decided here, in one place. Plain Python, no I/O;
the channel finds out the facts (is this a group admin?) and asks."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from chitrakar.domain import Command


class Role(StrEnum):
    BOT_ADMIN = "bot_admin"  # named in CHITRAKAR_ADMIN_IDS
    GROUP_ADMIN = "group_admin"  # an administrator of the group, as Telegram says
    MEMBER = "member"


class Permission(StrEnum):
    GENERATE = "generate"  # make images, press result buttons
    REPORT = "report"  # flag a result for review
    GROUP_SETTINGS = "group_settings"  # /settings in their group
    GROUP_QUOTA = "group_quota"  # /groupquota in their group
    BAN = "ban"  # /ban, /unban
    GRANT = "grant"  # /grant credits
    SET_QUOTA = "set_quota"  # /setquota of a user
    STATS = "stats"  # /stats, /queue
    PAUSE = "pause"  # /pause, /resume
    AUDIT = "audit"  # /audit
    REVIEW = "review"  # decide on reports


_MEMBER = frozenset({Permission.GENERATE, Permission.REPORT})
_GROUP_ADMIN = _MEMBER | {Permission.GROUP_SETTINGS, Permission.GROUP_QUOTA}
GRANTS: Mapping[Role, frozenset[Permission]] = {
    Role.MEMBER: _MEMBER,
    Role.GROUP_ADMIN: _GROUP_ADMIN,
    Role.BOT_ADMIN: frozenset(Permission),
}


def role_of(user_id: str, bot_admins: frozenset[str], is_group_admin: bool) -> Role:
    if user_id in bot_admins:
        return Role.BOT_ADMIN
    return Role.GROUP_ADMIN if is_group_admin else Role.MEMBER


def may(role: Role, permission: Permission, *, banned: bool = False) -> bool:
    """A banned user may do nothing; a bot admin is never banned from their own bot."""
    if banned and role != Role.BOT_ADMIN:
        return False
    return permission in GRANTS[role]


class Sender(StrEnum):
    """Who a message is from, as far as Telegram says."""

    PERSON = "person"  # a user, as themselves
    ANONYMOUS_ADMIN = "anonymous_admin"  # one of the group's admins, posting as the group
    CHAT = "chat"  # posted as a channel, or a linked channel's post forwarded automatically


def sender_kind(chat_id: int, sender_chat_id: int | None, automatic_forward: bool) -> Sender:
    """A message sent on behalf of a chat names no person: its `from` is a stand-in user that
    everyone posting that way shares (Channel_Bot, GroupAnonymousBot, 777000), so bans,
    credits and ownership cannot apply to it."""
    if automatic_forward:
        return Sender.CHAT
    if sender_chat_id is None:
        return Sender.PERSON
    return Sender.ANONYMOUS_ADMIN if sender_chat_id == chat_id else Sender.CHAT


# What an anonymous admin may send: being one of the group's admins is all Telegram says of
# them, and all these need. Anything else would act as the one stand-in user of every
# anonymous admin of every group (one quota, one history).
ANONYMOUS_ADMIN_COMMANDS = frozenset({Command.SETTINGS, Command.GROUP_QUOTA})


def refusal_for(sender: Sender, command: str) -> str | None:
    """The text key that refuses a command for who sent it; None when it may run."""
    if sender == Sender.PERSON:
        return None
    if sender == Sender.ANONYMOUS_ADMIN:
        return None if command in ANONYMOUS_ADMIN_COMMANDS else "moderation.sent_anonymously"
    return "moderation.sent_as_chat"
