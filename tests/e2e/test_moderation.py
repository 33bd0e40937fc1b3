"""Admin commands, bans, pausing, group settings, the prompt block lists and /report, end to
end: the real bot and worker (`chitrakar run`, tiny model) against the Bot API emulator."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy import text as sql

from chitrakar.texts import text
from db.models import AuditEvent
from db.session import Store
from tests.support.botapi import BotApiEmulator, Call
from tests.support.stack import chitrakar_env, chitrakar_process, jobs_in_chat

pytestmark = pytest.mark.e2e
ADMIN_ID = 9001
_fresh_ids = itertools.count(5000)
Stack = tuple[BotApiEmulator, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    emulator = BotApiEmulator().start()
    data_dir = tmp_path_factory.mktemp("data")
    env = chitrakar_env(emulator, data_dir, tiny_model, admin_ids=str(ADMIN_ID))
    with chitrakar_process("run", env=env, log_dir=data_dir):
        emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", 60)
        yield emulator, f"sqlite:///{data_dir / 'chitrakar.db'}"
    emulator.stop()


def answer_to(message: dict[str, Any]) -> Callable[[Call], bool]:
    def check(call: Call) -> bool:
        result = call.result if isinstance(call.result, dict) else {}
        return (
            call.params.get("chat_id") == message["chat"]["id"]
            and result.get("message_id", 0) > message["message_id"]
        )

    return check


def say(emulator: BotApiEmulator, chat: dict[str, Any], user: dict[str, Any], words: str) -> str:
    """Send a message and return the text of the bot's next message in that chat."""
    message = emulator.send_text(chat, user, words)
    return str(emulator.wait_for("sendMessage", answer_to(message), timeout=60).params["text"])


def say_replying(
    emulator: BotApiEmulator,
    chat: dict[str, Any],
    user: dict[str, Any],
    words: str,
    reply_to: dict[str, Any],
) -> str:
    """`say`, as a reply to `reply_to`."""
    message = emulator.send_text(chat, user, words, reply_to=reply_to)
    return str(emulator.wait_for("sendMessage", answer_to(message), timeout=60).params["text"])


def audit_events(database_url: str) -> list[AuditEvent]:
    store = Store(database_url)
    try:
        with store.unit_of_work() as uow:
            events = list(uow.session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
            uow.session.expunge_all()
            return events
    finally:
        store.dispose()


def wait_done(database_url: str, chat_id: int, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        jobs = jobs_in_chat(database_url, chat_id)
        if len([j for j in jobs if j.status in ("done", "failed", "blocked")]) >= count:
            return
        time.sleep(0.1)
    raise AssertionError("jobs did not end")


ADMIN_COMMANDS = [
    ("/ban 777 spam", "admin.banned", {"user": "777"}),
    ("/unban 777", "admin.unbanned", {"user": "777"}),
    ("/grant 777 5", "admin.granted", {"user": "777", "credits": 5}),
    ("/setquota 777 30", "admin.quota_set", {"user": "777", "credits": 30}),
    ("/setquota 777 default", "admin.quota_reset", {"user": "777"}),
    ("/pause Back after the upgrade", "admin.paused", {"notice": "Back after the upgrade"}),
    ("/resume", "admin.resumed", {}),
]


@pytest.mark.parametrize(("command", "key", "params"), ADMIN_COMMANDS)
def test_admin_commands_work_for_admins_and_are_refused_and_recorded_for_others(
    stack: Stack, command: str, key: str, params: dict[str, Any]
) -> None:
    emulator, database_url = stack
    admin = emulator.user(ADMIN_ID, "Admin")
    member = emulator.user(next(_fresh_ids), "Member")
    assert say(emulator, emulator.private_chat(member), member, command) == text(
        "en", "admin.not_allowed"
    )
    refused = [e for e in audit_events(database_url) if e.actor == str(member["id"])]
    assert refused and refused[-1].allowed is False
    assert say(emulator, emulator.private_chat(admin), admin, command) == text("en", key, **params)
    done = [e for e in audit_events(database_url) if e.actor == str(ADMIN_ID)]
    assert done[-1].allowed is True


@pytest.mark.parametrize("command", ["/stats", "/queue", "/audit"])
def test_reports_for_admins_only(stack: Stack, command: str) -> None:
    emulator, _ = stack
    admin = emulator.user(ADMIN_ID, "Admin")
    member = emulator.user(next(_fresh_ids), "Member")
    assert say(emulator, emulator.private_chat(member), member, command) == text(
        "en", "admin.not_allowed"
    )
    reply = say(emulator, emulator.private_chat(admin), admin, command)
    assert reply != text("en", "admin.not_allowed")
    if command == "/stats":
        assert reply.startswith("Today, since midnight (UTC)")
    if command == "/audit":
        assert reply.startswith(text("en", "admin.audit_header"))


@pytest.mark.parametrize("command", ["/stats", "/queue", "/audit"])
def test_reports_asked_in_a_group_go_to_the_admins_private_chat(stack: Stack, command: str) -> None:
    """They show other users' ids, names and ban reasons: not to everyone in the group."""
    emulator, _ = stack
    admin = emulator.user(ADMIN_ID, "Admin")
    group = emulator.group_chat(-800_000 - next(_fresh_ids))
    sent_before = len(emulator.calls_to("sendMessage", ADMIN_ID))
    asked = emulator.send_text(group, admin, command)
    note = emulator.wait_for("sendMessage", answer_to(asked), timeout=60)
    assert note.params["text"] == text("en", "admin.sent_privately")
    # Sent before the note.
    [answer] = emulator.calls_to("sendMessage", ADMIN_ID)[sent_before:]
    assert answer.params["text"] != text("en", "admin.not_allowed")
    if command == "/stats":
        assert answer.params["text"].startswith("Today, since midnight (UTC)")
    assert emulator.calls_to("sendMessage", group["id"]) == [note]
    # An admin who has never opened a private chat with the bot is told to.
    emulator.fail(
        "sendMessage",
        403,
        "Forbidden: bot can't initiate conversation with a user",
        chat_id=ADMIN_ID,
    )
    again = emulator.send_text(group, admin, command)
    told = emulator.wait_for("sendMessage", answer_to(again), timeout=60)
    assert told.params["text"] == text("en", "admin.private_first", bot_username=emulator.username)


def test_a_banned_user_gets_one_short_reply_and_nothing_else(stack: Stack) -> None:
    emulator, database_url = stack
    admin = emulator.user(ADMIN_ID, "Admin")
    user = emulator.user(next(_fresh_ids), "Spammer")
    chat = emulator.private_chat(user)
    say(emulator, emulator.private_chat(admin), admin, f"/ban {user['id']} flooding")
    assert say(emulator, chat, user, "/portrait a fort") == text("en", "moderation.banned")
    assert jobs_in_chat(database_url, chat["id"]) == []
    say(emulator, emulator.private_chat(admin), admin, f"/unban {user['id']}")
    assert say(emulator, chat, user, "/portrait a fort") == text("en", "status.queued", position=1)


def test_a_banned_users_commands_to_other_bots_are_none_of_this_bots_business(
    stack: Stack,
) -> None:
    """In a group, `/start@OtherBot` and another bot's unaddressed `/roll` get no ban notice
    (it told the group, and used up the one notice the user's own command should get)."""
    emulator, _ = stack
    admin = emulator.user(ADMIN_ID, "Admin")
    user = emulator.user(next(_fresh_ids), "Spammer")
    group = emulator.group_chat(-next(_fresh_ids))
    say(emulator, emulator.private_chat(admin), admin, f"/ban {user['id']} flooding")
    others = [emulator.send_text(group, user, words) for words in ("/start@OtherBot", "/roll")]
    own = emulator.send_text(group, user, "/portrait@" + emulator.username + " a fort")
    told = emulator.wait_for("sendMessage", answer_to(own), timeout=60)
    assert told.params["text"] == text("en", "moderation.banned")
    quoted = [
        (call.params.get("reply_parameters") or {}).get("message_id")
        for call in emulator.calls_to("sendMessage", group["id"])
    ]
    assert quoted == [own["message_id"]], (quoted, others)


def test_a_ban_check_that_fails_is_one_apology_and_no_job(stack: Stack) -> None:
    """The database cannot say whether the user is banned: one apology, and the command it
    was to guard does not run (it used to, after the apology: a banned user got through)."""
    emulator, database_url = stack
    user = emulator.user(next(_fresh_ids), "Unlucky")
    chat = emulator.private_chat(user)
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:  # bans live on the users table
            connection.execute(sql("ALTER TABLE users RENAME TO users_away"))
        try:
            message = emulator.send_text(chat, user, "/portrait a fort")
            first = emulator.wait_for("sendMessage", answer_to(message), timeout=60)
            assert first.params["text"] == text("en", "error.unexpected")
            # The guarded command would answer (or fail) at once after the apology.
            time.sleep(2.0)
        finally:
            with engine.begin() as connection:
                connection.execute(sql("ALTER TABLE users_away RENAME TO users"))
    finally:
        engine.dispose()
    assert [call.params["text"] for call in emulator.calls_to("sendMessage", chat["id"])] == [
        text("en", "error.unexpected")
    ]
    assert jobs_in_chat(database_url, chat["id"]) == []


def test_pause_tells_users_and_resume_lets_them_in(stack: Stack) -> None:
    emulator, database_url = stack
    admin = emulator.user(ADMIN_ID, "Admin")
    user = emulator.user(next(_fresh_ids), "Patient")
    chat = emulator.private_chat(user)
    say(emulator, emulator.private_chat(admin), admin, "/pause GPU maintenance until 6 pm")
    paused_notice = text("en", "service.paused", notice="GPU maintenance until 6 pm")
    assert say(emulator, chat, user, "/portrait a fort") == paused_notice
    assert jobs_in_chat(database_url, chat["id"]) == []
    # /styles lists the catalogue, then says why no previews are being made.
    styles = emulator.send_text(chat, user, "/styles")
    emulator.wait_for(
        "sendMessage",
        lambda c: answer_to(styles)(c) and c.params["text"] == paused_notice,
        timeout=30,
    )
    sent = [c.params["text"] for c in emulator.calls_to("sendMessage", chat["id"])]
    assert text("en", "error.unexpected") not in sent
    assert jobs_in_chat(database_url, chat["id"]) == []
    say(emulator, emulator.private_chat(admin), admin, "/resume")
    assert say(emulator, chat, user, "/portrait a fort").startswith("Queued.")


def test_a_bare_pause_tells_each_user_in_their_own_language(stack: Stack) -> None:
    emulator, _ = stack
    admin = emulator.user(ADMIN_ID, "Admin")
    hindi = emulator.user(next(_fresh_ids), "Meera", language_code="hi")
    english = emulator.user(next(_fresh_ids), "Ann")
    try:
        assert say(emulator, emulator.private_chat(admin), admin, "/pause") == text(
            "en", "admin.paused", notice=text("en", "service.paused_default")
        )
        for user, language in ((hindi, "hi"), (english, "en")):
            chat = emulator.private_chat(user)
            reply = say(emulator, chat, user, "/portrait a fort")
            assert reply == text(language, "service.paused_default")
    finally:
        say(emulator, emulator.private_chat(admin), admin, "/resume")


@pytest.mark.parametrize(
    "prompt",
    [
        "a nude woman on a beach",  # English
        "एक नग्न महिला",  # Hindi
        "ek nangi ladki",  # Hinglish
        "a n.u.d.e woman",  # an evasion
    ],
)
def test_a_blocked_prompt_queues_and_charges_nothing(stack: Stack, prompt: str) -> None:
    emulator, database_url = stack
    user = emulator.user(next(_fresh_ids), "Tester")
    chat = emulator.private_chat(user)
    assert say(emulator, chat, user, f"/portrait {prompt}") == text("en", "safety.prompt_blocked")
    assert jobs_in_chat(database_url, chat["id"]) == []
    assert say(emulator, chat, user, "/quota").startswith("Credits left today: 20 of 20.")
    blocked = [e for e in audit_events(database_url) if e.action == "prompt_blocked"]
    assert blocked[-1].target == f"user:{user['id']}"


def test_group_settings_apply_in_that_group_only(stack: Stack) -> None:
    emulator, database_url = stack
    group_admin = emulator.user(next(_fresh_ids), "Host")
    member = emulator.user(next(_fresh_ids), "Guest")
    group = emulator.group_chat(-400_000 - next(_fresh_ids))
    other = emulator.group_chat(-400_000 - next(_fresh_ids))
    emulator.set_admins(group["id"], [group_admin["id"]])

    assert say(emulator, group, member, "/settings") == text("en", "settings.admins_only")
    asked = emulator.send_text(group, group_admin, "/settings")
    panel = emulator.wait_for("sendMessage", answer_to(asked), timeout=30).result
    data = [b["callback_data"] for row in emulator.buttons_of(panel) for b in row]
    assert {"g:c:portrait:off", "g:s:anime:off", "g:p:block", "g:x:on", "g:q:20"} <= set(data)

    refused = emulator.press(panel, member, "g:c:portrait:off")
    # The group's admins may, not only the bot's: the refusal says so.
    assert emulator.wait_for_answer(refused).params["text"] == text("en", "settings.admins_only")

    def press_and_wait(data_: str) -> dict[str, Any]:
        edits = len(emulator.calls_to("editMessageText", group["id"]))
        emulator.wait_for_answer(emulator.press(panel, group_admin, data_))
        deadline = time.monotonic() + 30
        while len(emulator.calls_to("editMessageText", group["id"])) == edits:
            assert time.monotonic() < deadline, "the settings message was not updated"
            time.sleep(0.05)
        return dict(emulator.calls_to("editMessageText", group["id"])[-1].result)

    panel = press_and_wait("g:s:anime:off")
    assert say(emulator, group, member, "/portrait a fort --style anime") == text(
        "en", "settings.style_off", style="Anime"
    )
    panel = press_and_wait("g:c:portrait:off")
    assert "/portrait off" in panel["text"]
    assert say(emulator, group, member, "/portrait a fort") == text(
        "en", "settings.command_off", command="portrait"
    )
    # The same button pressed again (a double tap, or another admin's older panel) leaves
    # the command off; the panel now offers to switch it on.
    assert "g:c:portrait:on" in {
        b["callback_data"] for row in emulator.buttons_of(panel) for b in row
    }
    again = emulator.press(panel, group_admin, "g:c:portrait:off", check_button=False)
    emulator.wait_for_answer(again)
    assert say(emulator, group, member, "/portrait a fort") == text(
        "en", "settings.command_off", command="portrait"
    )
    # Another group is not affected.
    assert say(emulator, other, member, "/portrait a fort --style anime").startswith("Queued.")

    # The group becomes a supergroup (a new chat id): its settings go with it.
    supergroup = emulator.migrate(group["id"], group["id"] - 1_000_000_000_000, by=group_admin)
    deadline = time.monotonic() + 30
    while audit_events(database_url)[-1].action != "chat_moved":
        assert time.monotonic() < deadline, "the bot did not move the group's settings"
        time.sleep(0.1)
    assert say(emulator, supergroup, member, "/portrait a fort") == text(
        "en", "settings.command_off", command="portrait"
    )


def a_result_in_a_group(stack: Stack, command: str) -> tuple[dict[str, Any], dict[str, Any], Call]:
    """A new group where a member's command has been answered with a photo, its job done;
    the group, another member (who may report it) and the photo's sendPhoto call."""
    emulator, database_url = stack
    asker, reporter = (emulator.user(next(_fresh_ids), n) for n in ("Asker", "Watcher"))
    group = emulator.group_chat(-500_000 - next(_fresh_ids))
    emulator.send_text(group, asker, command)
    photo = emulator.wait_for(
        "sendPhoto",
        lambda c: c.params.get("chat_id") == group["id"] and isinstance(c.result, dict),
        timeout=120,
    )
    wait_done(database_url, group["id"], 1)
    return group, reporter, photo


def test_report_in_a_forum_topic_not_replying_to_a_result_says_how_to_report(
    stack: Stack,
) -> None:
    """In a topic, every message replies to the topic's first one: that is no result."""
    emulator, _ = stack
    member = emulator.user(next(_fresh_ids), "Member")
    group = emulator.group_chat(-900_000 - next(_fresh_ids))
    topic = {  # (an id the emulator has not given: it quotes what it stored under an id)
        "message_id": 1_000_000,
        "date": 1_700_000_000,
        "chat": group,
        "forum_topic_created": {"name": "Art", "icon_color": 7322096},
    }
    assert say_replying(emulator, group, member, "/report", topic) == text("en", "report.usage")


def test_report_reaches_the_admins_and_their_buttons_work(stack: Stack) -> None:
    emulator, database_url = stack
    admin = emulator.user(ADMIN_ID, "Admin")
    admin_chat = emulator.private_chat(admin)
    group, reporter, photo = a_result_in_a_group(stack, "/portrait a festival crowd")

    reply = emulator.send_text(group, reporter, "/report", reply_to=photo.result)
    thanks = emulator.wait_for("sendMessage", answer_to(reply), timeout=30)
    assert thanks.params["text"] == text("en", "report.sent")
    card = emulator.wait_for(
        "sendPhoto", lambda c: c.params.get("chat_id") == admin_chat["id"], timeout=30
    )
    data = [
        b["callback_data"] for row in card.params["reply_markup"]["inline_keyboard"] for b in row
    ]
    report_id = data[0].split(":")[1]
    assert data == [f"w:{report_id}:d", f"w:{report_id}:x", f"w:{report_id}:b"]
    # Reporting again finds the open report: the reporter is told, the admins not again.
    assert say_replying(emulator, group, reporter, "/report", photo.result) == text(
        "en", "report.already_sent"
    )
    time.sleep(1.0)  # a second card would follow the reply
    assert len(emulator.calls_to("sendPhoto", admin_chat["id"])) == 1

    # Only a bot admin may decide; the admin deletes the result from the group.
    refused = emulator.press(card.result, reporter, f"w:{report_id}:x", check_button=True)
    assert emulator.wait_for_answer(refused).params["text"] == text("en", "admin.not_allowed")
    emulator.press(card.result, admin, f"w:{report_id}:x")
    emulator.wait_for(
        "deleteMessage",
        lambda c: (
            c.params.get("chat_id") == group["id"]
            and c.params.get("message_id") == photo.result["message_id"]
        ),
        timeout=30,
    )
    again = emulator.press(card.result, admin, f"w:{report_id}:b", check_button=False)
    assert emulator.wait_for_answer(again).params["text"] == text("en", "report.already_decided")
    actions = [e.action for e in audit_events(database_url)]
    assert "report" in actions and "review_deleted" in actions


def test_a_deleted_result_that_stays_in_the_chat_is_named_to_the_admin(stack: Stack) -> None:
    """Telegram refuses to delete the message (older than it allows): the admin is told that
    the image is still there, not that it was deleted."""
    emulator, _ = stack
    admin = emulator.user(ADMIN_ID, "Admin")
    admin_chat = emulator.private_chat(admin)
    group, reporter, photo = a_result_in_a_group(stack, "/portrait an old fort")
    emulator.send_text(group, reporter, "/report", reply_to=photo.result)
    card = emulator.wait_for(
        "sendPhoto",
        lambda c: (
            c.params.get("chat_id") == admin_chat["id"]
            and f"in chat {group['id']}" in c.params.get("caption", "")
        ),
        timeout=30,
    )
    report_id = card.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"].split(":")[1]
    emulator.fail(
        "deleteMessage", 400, "Bad Request: message can't be deleted", chat_id=group["id"]
    )
    pressed = emulator.press(card.result, admin, f"w:{report_id}:x")
    assert emulator.wait_for_answer(pressed).params["text"] == text(
        "en",
        "report.decided_left_in_chat",
        report=report_id,
        decision=text("en", "report.decision_deleted"),
        admin=ADMIN_ID,
        count=1,
    )


def test_a_report_whose_answer_fails_still_reaches_the_admins(stack: Stack) -> None:
    """The reporter's answer fails (a flood wait): the report is open, so a repeated /report
    sends no card; the admins must have had theirs all the same."""
    emulator, _ = stack
    admin_chat = emulator.private_chat(emulator.user(ADMIN_ID, "Admin"))
    group, reporter, photo = a_result_in_a_group(stack, "/portrait a night market")

    def card_about_it(call: Call) -> bool:
        about = f"in chat {group['id']}\n" in str(call.params.get("caption") or "")
        return call.params.get("chat_id") == admin_chat["id"] and about

    emulator.fail(
        "sendMessage", 429, "Too Many Requests: retry after 5", retry_after=5, chat_id=group["id"]
    )
    emulator.send_text(group, reporter, "/report", reply_to=photo.result)
    emulator.wait_for("sendPhoto", card_about_it, timeout=30)
    assert say_replying(emulator, group, reporter, "/report", photo.result) == text(
        "en", "report.already_sent"
    )
    assert (
        len([c for c in emulator.calls_to("sendPhoto", admin_chat["id"]) if card_about_it(c)]) == 1
    )


def test_admin_commands_as_a_reply_are_about_its_author_and_take_every_word(
    stack: Stack,
) -> None:
    emulator, database_url = stack
    admin = emulator.user(ADMIN_ID, "Admin")
    member = emulator.user(next(_fresh_ids), "Member")
    group = emulator.group_chat(-600_000 - next(_fresh_ids))
    said = emulator.send_text(group, member, "hello everyone")
    user = str(member["id"])

    def reply(words: str) -> str:
        return say_replying(emulator, group, admin, words, said)

    assert reply("/grant 20") == text("en", "admin.granted", user=user, credits=20)
    assert reply("/setquota 5") == text("en", "admin.quota_set", user=user, credits=5)
    assert reply("/setquota default") == text("en", "admin.quota_reset", user=user)
    assert reply("/ban 3 strikes") == text("en", "admin.banned", user=user)
    ban = [e for e in audit_events(database_url) if e.action == "ban"][-1]
    assert (ban.target, ban.reason) == (f"user:{user}", "3 strikes")
    assert reply("/unban") == text("en", "admin.unbanned", user=user)
    assert reply("/grant") == text("en", "admin.usage_grant")
    # Another user's id as well: which of the two is meant cannot be told, so neither.
    assert reply("/ban 777777 spam") == text("en", "admin.target_ambiguous")
    assert not [e for e in audit_events(database_url) if e.target == "user:777777"]
    # Its author's own id is only said twice.
    assert reply(f"/grant {user} 2") == text("en", "admin.granted", user=user, credits=2)


def test_commands_sent_on_behalf_of_a_chat(stack: Stack) -> None:
    """Posted as a channel or forwarded from the linked one, a command names no person (its
    sender is a stand-in user everyone posting that way shares): refused. An anonymous admin,
    posting as the group itself, is one of its admins: the group's settings work."""
    emulator, database_url = stack
    admin = emulator.user(ADMIN_ID, "Admin")
    group = emulator.group_chat(-700_000 - next(_fresh_ids))
    channel = {"id": -1_000_000_000_000 - next(_fresh_ids), "type": "channel", "title": "News"}
    as_channel = text("en", "moderation.sent_as_chat")

    def said_by(sent: dict[str, Any]) -> str:
        call = emulator.wait_for("sendMessage", answer_to(sent), timeout=60)
        return str(call.params["text"])

    post = emulator.send_as_chat(group, channel, "/portrait a fort")
    assert said_by(post) == as_channel
    photo = b"a selfie, as far as the refusal cares"
    assert said_by(emulator.send_as_chat(group, channel, "/avatar anime", photo=photo)) == (
        as_channel
    )
    forwarded = emulator.send_as_chat(group, channel, "/portrait a lake", automatic_forward=True)
    assert said_by(forwarded) == as_channel
    # Its author cannot be banned by a reply: Telegram does not say who they are.
    assert say_replying(emulator, group, admin, "/ban", post) == text("en", "admin.author_unknown")

    assert said_by(emulator.send_as_chat(group, group, "/settings")).startswith(
        text("en", "settings.header", commands="", styles="", policy="", spoilers="", quota="")[:20]
    )
    assert said_by(emulator.send_as_chat(group, group, "/groupquota 10")) == text(
        "en", "quota.group_set", limit=10
    )
    assert said_by(emulator.send_as_chat(group, group, "/portrait a fort")) == text(
        "en", "moderation.sent_anonymously"
    )
    assert jobs_in_chat(database_url, group["id"]) == []
