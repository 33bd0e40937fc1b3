"""Rules at the chat's edge, as plain Python: who a message is from, what runs for them, and
whom an admin command is about."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from telegram import Chat, Message

from bot.handlers import command_of
from chitrakar import replies
from chitrakar.admin_commands import admin_reply
from chitrakar.domain import Command
from chitrakar.moderation import Actor
from chitrakar.permissions import Role, Sender, refusal_for, sender_kind
from chitrakar.texts import text

GROUP, CHANNEL = -100_200, -100_300


@pytest.mark.parametrize(
    ("sender_chat", "automatic_forward", "expected"),
    [
        (None, False, Sender.PERSON),
        (GROUP, False, Sender.ANONYMOUS_ADMIN),  # posting as the group itself
        (CHANNEL, False, Sender.CHAT),  # posting as a channel
        (CHANNEL, True, Sender.CHAT),  # the linked channel's post, forwarded
        (GROUP, True, Sender.CHAT),
    ],
)
def test_who_a_message_is_from(
    sender_chat: int | None, automatic_forward: bool, expected: Sender
) -> None:
    assert sender_kind(GROUP, sender_chat, automatic_forward) == expected


@pytest.mark.parametrize("command", ["portrait", "avatar", "ban", "settings", "report"])
def test_a_person_may_send_any_command_and_a_channel_none(command: str) -> None:
    assert refusal_for(Sender.PERSON, command) is None
    assert refusal_for(Sender.CHAT, command) == "moderation.sent_as_chat"


def test_an_anonymous_admin_may_change_the_groups_settings_only() -> None:
    assert refusal_for(Sender.ANONYMOUS_ADMIN, "settings") is None
    assert refusal_for(Sender.ANONYMOUS_ADMIN, "groupquota") is None
    for command in ("portrait", "avatar", "history", "ban", "grant"):
        assert refusal_for(Sender.ANONYMOUS_ADMIN, command) == "moderation.sent_anonymously"


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["20"], ("42", ["20"])),  # /grant 20
        (["5"], ("42", ["5"])),  # /setquota 5
        (["3", "strikes"], ("42", ["3", "strikes"])),  # /ban 3 strikes
        (["default"], ("42", ["default"])),
        ([], ("42", [])),
        (["1234", "spam"], ("42", ["1234", "spam"])),  # too short for a user id
        (["42", "20"], ("42", ["20"])),  # /grant <their id> 20: said twice
        (["0042"], ("42", [])),
    ],
)
def test_an_admin_command_as_a_reply_is_about_its_author_and_every_word_an_argument(
    words: list[str], expected: tuple[str | None, list[str]]
) -> None:
    assert replies.admin_target(words, replied_author="42") == expected
    assert not replies.ambiguous_target(words, replied_author="42")


@pytest.mark.parametrize(
    "words",
    [["12345"], ["12345", "spam"], ["987654321", "20"]],
)
def test_an_admin_command_as_a_reply_that_gives_another_users_id_names_no_one(
    words: list[str],
) -> None:
    """`/ban 12345` as a reply to someone else: neither is banned, and the admin is told why."""
    assert replies.admin_target(words, replied_author="55555") == (None, words)
    assert replies.ambiguous_target(words, replied_author="55555")
    assert replies.admin_target(["55555", *words[1:]], "55555") == ("55555", words[1:])
    # Without a reply, the id is the target, as before.
    assert replies.admin_target(words) == (words[0], words[1:])
    assert not replies.ambiguous_target(words, None)


@pytest.mark.parametrize("command", [Command.BAN, Command.UNBAN, Command.GRANT, Command.SET_QUOTA])
def test_an_admin_is_told_to_reply_or_give_an_id_not_both(command: Command) -> None:
    class Permitting:
        def check(self, actor: Actor, permission: object, action: str) -> None:
            pass

    actor = Actor("telegram", "9001", Role.BOT_ADMIN, -100_200)
    reply = admin_reply(
        command,
        actor,
        "hi",
        None,
        ["12345"],
        "12345",
        target_ambiguous=True,
        moderation=Permitting(),  # type: ignore[arg-type]
        intake=None,  # type: ignore[arg-type]
        settings=None,  # type: ignore[arg-type]
    )
    assert reply == text("hi", "admin.target_ambiguous")


@pytest.mark.parametrize(
    ("text", "caption", "expected"),
    [
        ("/Portrait a fort", None, "portrait"),
        ("/portrait@Chitrakar_Bot a fort", None, "portrait"),
        ("/portrait@other_bot a fort", None, None),  # another bot's
        ("hello /portrait", None, None),
        (None, "/avatar@chitrakar_bot anime", "avatar"),
        (None, "/avatar@other_bot anime", None),
        (None, None, None),
    ],
)
def test_the_command_a_message_gives_this_bot(
    text: str | None, caption: str | None, expected: str | None
) -> None:
    group = Chat(GROUP, Chat.SUPERGROUP)
    message = Message(1, datetime.now(UTC), group, text=text, caption=caption)
    assert command_of(message, "chitrakar_bot") == expected
