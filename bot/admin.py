"""Admin and moderation in the chat: the ban gate, bot admins' commands, a group's /settings,
/report and its review card. Each handler turns the message into a call on
`chitrakar.moderation`, which decides the permission and writes the audit log."""

from __future__ import annotations

import asyncio
import logging
import time

from telegram import InlineKeyboardMarkup, Message, Update
from telegram.constants import ChatType
from telegram.error import Forbidden, TelegramError
from telegram.ext import ApplicationHandlerStop

from bot.bootstrap import CHANNEL
from bot.context import BotContext, actor_of, language_of, sender_of_message
from bot.handlers import command_arguments, command_of, keyboard, own_command
from chitrakar import replies
from chitrakar.admin_commands import admin_reply
from chitrakar.buttons import Action, Button, ButtonPress, review_buttons
from chitrakar.domain import Command, CommandError
from chitrakar.moderation import Actor, NotAllowed
from chitrakar.permissions import Permission, Sender, may, refusal_for
from chitrakar.texts import DEFAULT_LANGUAGE, text

log = logging.getLogger(__name__)

# A banned user is told at most this often.
BANNED_REPLY_EVERY_S = 300.0
# Commands a group's admins can switch off in /settings.
SWITCHABLE_COMMANDS = ("portrait", "avatar")
GROUP_QUOTA_CHOICES = ("off", "10", "20", "50", "100")
POLICIES = ("default", "block", "spoiler", "allow")
DECISION_NAMES = {
    "dismissed": "report.decision_dismissed",
    "deleted": "report.decision_deleted",
    "banned": "report.decision_banned",
}


async def sender_gate(update: Update, context: BotContext) -> None:
    """Before the ban gate: a command sent on behalf of a chat (as a channel, a linked
    channel's automatic forward) is refused, as there is no person to ban, charge or own its
    result; an anonymous admin may change the group's settings, nothing else."""
    message = update.message
    # A person's message (nearly every update) goes on without its command being read.
    if message is None or (sender := sender_of_message(message)) == Sender.PERSON:
        return
    command = own_command(message, context.bot.username)
    if command is None:
        return
    refusal = refusal_for(sender, command)
    if refusal is None:
        return
    try:
        await message.reply_text(text(language_of(update), refusal))
    except TelegramError as exc:
        log.info("could not refuse a command sent on behalf of a chat: %s", exc)
    raise ApplicationHandlerStop


async def chat_migrated(update: Update, context: BotContext) -> None:
    """A group became a supergroup: Telegram says so in the old chat (`migrate_to_chat_id`)
    and in the new one (`migrate_from_chat_id`); either moves its settings, once."""
    message = update.effective_message
    if message is None:
        return
    if message.migrate_to_chat_id is not None:
        old, new = message.chat_id, message.migrate_to_chat_id
    elif message.migrate_from_chat_id is not None:
        old, new = message.migrate_from_chat_id, message.chat_id
    else:
        return
    await asyncio.to_thread(context.services.moderation.chat_moved, CHANNEL, old, new)


async def ban_gate(update: Update, context: BotContext) -> None:
    """Before any handler: a banned user's commands and presses get one short answer and go
    no further. Plain chat messages, and commands for other bots, are ignored as before."""
    user = update.effective_user
    if user is None:
        return
    message = update.effective_message
    is_own_command = bool(message and own_command(message, context.bot.username))
    if update.callback_query is None and not is_own_command:
        return
    moderation = context.services.moderation
    banned = await context.calls.is_banned(str(user.id))
    role = moderation.role_of(str(user.id), is_group_admin=False)
    if may(role, Permission.GENERATE, banned=banned):
        return
    # One short reply now and then, not one per message: a banned user must not be able to
    # make the bot flood a group.
    told: dict[int, float] = context.bot_data.setdefault("banned_told", {})
    now = time.monotonic()
    if told.get(user.id, 0.0) > now:
        raise ApplicationHandlerStop
    told[user.id] = now + BANNED_REPLY_EVERY_S
    refusal = text(language_of(update), "moderation.banned")
    try:
        if update.callback_query is not None:
            await update.callback_query.answer(refusal, show_alert=True)
        elif message is not None:
            await message.reply_text(refusal)
    except TelegramError as exc:
        log.info("could not answer banned user %s: %s", user.id, exc)
    raise ApplicationHandlerStop


async def _reply(message: Message, update: Update, key: str, **params: object) -> None:
    # Sent even when the command was deleted meanwhile (as the status messages are).
    await message.reply_text(
        text(language_of(update), key, **params), allow_sending_without_reply=True
    )


def _replied_to(message: Message) -> Message | None:
    """The message a command replies to; None for none, or for a forum topic's first
    message (in a topic, every message "replies" to it)."""
    replied = message.reply_to_message
    if replied is None or replied.forum_topic_created is not None:
        return None
    return replied


def _on_behalf_of_chat(message: Message) -> bool:
    """Sent as a channel or the group, or forwarded from the linked channel: Telegram names
    no person as its author."""
    return sender_of_message(message) != Sender.PERSON


def _author(message: Message) -> str | None:
    """The person who wrote a message; None for a bot's, or one sent on behalf of a chat."""
    user = message.from_user
    if user is None or user.is_bot or _on_behalf_of_chat(message):
        return None
    return str(user.id)


async def admin_command(update: Update, context: BotContext) -> None:
    """A bot admin's command (/ban, /grant, /stats…): the target is the author of the
    message replied to (every word then an argument, but an id: `replies.admin_target`),
    else an id given first."""
    message = update.effective_message
    if message is None or message.text is None:
        return
    named = command_of(message, context.bot.username)
    if named is None:  # CommandHandler routed it here: never
        return
    command = Command(named)
    actor = await actor_of(update, context)
    language = language_of(update)
    replied = _replied_to(message)
    author = _author(replied) if replied is not None else None
    words = command_arguments(message).split()
    target, rest = replies.admin_target(words, author)
    author_unknown = replied is not None and _on_behalf_of_chat(replied)
    services = context.services
    try:
        reply = await asyncio.to_thread(
            lambda: admin_reply(
                command,
                actor,
                language,
                target,
                rest,
                command_arguments(message),
                author_unknown=author_unknown,
                # Replying, only another user's id first leaves it without a target.
                target_ambiguous=author is not None and target is None,
                moderation=services.moderation,
                intake=services.intake,
                settings=services.settings,
            )
        )
    except CommandError as exc:
        await message.reply_text(text(language, exc.key, **exc.params))
        return
    if command in ANSWERED_PRIVATELY and message.chat.type != ChatType.PRIVATE:
        await _answer_privately(message, actor, language, reply, context)
        return
    await message.reply_text(reply)


# What these show (other users' ids and names, ban reasons, who waits in which chat) is for
# the admin alone: asked in a group, the answer goes to their private chat with the bot.
ANSWERED_PRIVATELY = frozenset({Command.STATS, Command.QUEUE, Command.AUDIT})


async def _answer_privately(
    message: Message, actor: Actor, language: str, reply: str, context: BotContext
) -> None:
    try:
        await context.bot.send_message(int(actor.user_id), reply)
    except Forbidden:  # they have never opened a private chat with the bot
        await message.reply_text(
            text(language, "admin.private_first", bot_username=context.bot.username)
        )
        return
    await message.reply_text(text(language, "admin.sent_privately"))


def _settings_view(
    update: Update, context: BotContext, chat_id: int
) -> tuple[str, InlineKeyboardMarkup]:
    """The /settings message: what is set now, and a button for each change."""
    language = language_of(update)
    services = context.services
    view = services.moderation.chat_settings(CHANNEL, chat_id)
    quota = services.intake.group_quota(CHANNEL, chat_id)

    def state(on: bool) -> str:
        return text(language, "settings.on" if on else "settings.off")

    def asked(key: str, disabled: frozenset[str]) -> str:
        """What pressing the button asks for: the other state than the one shown."""
        return "on" if key in disabled else "off"

    policy_names = {
        "default": text(language, "settings.policy_default"),
        "block": text(language, "settings.policy_block"),
        "spoiler": text(language, "settings.policy_spoiler"),
        "allow": text(language, "settings.policy_allow"),
    }
    current_policy = view.content_policy or "default"
    rows: list[list[Button]] = [
        [
            Button(
                "button.setting_command",
                ButtonPress(
                    Action.SETTING, value=f"c:{command}:{asked(command, view.disabled_commands)}"
                ),
                {"command": command, "state": state(command not in view.disabled_commands)},
            )
            for command in SWITCHABLE_COMMANDS
        ],
        [
            Button(
                "button.setting_policy",
                ButtonPress(Action.SETTING, value=f"p:{policy}"),
                {"policy": policy_names[policy], "mark": "✓ " if policy == current_policy else ""},
            )
            for policy in POLICIES
        ],
        [
            Button(
                "button.setting_spoilers",
                ButtonPress(Action.SETTING, value=f"x:{'off' if view.spoilers else 'on'}"),
                {"state": state(view.spoilers)},
            )
        ],
        [
            Button(
                "button.setting_quota",
                ButtonPress(Action.SETTING, value=f"q:{choice}"),
                {
                    "quota": text(language, "settings.unlimited") if choice == "off" else choice,
                    "mark": "✓ "
                    if (quota is None and choice == "off") or str(quota) == choice
                    else "",
                },
            )
            for choice in GROUP_QUOTA_CHOICES
        ],
    ]
    styles = [
        Button(
            "button.setting_style",
            ButtonPress(
                Action.SETTING, value=f"s:{style.key}:{asked(style.key, view.disabled_styles)}"
            ),
            {
                "name": style.name_in(language),
                "state": state(style.key not in view.disabled_styles),
            },
        )
        for style in services.intake.catalogue.styles.values()
    ]
    rows += [styles[i : i + 2] for i in range(0, len(styles), 2)]
    body = text(
        language,
        "settings.header",
        commands=", ".join(
            f"/{c} {state(c not in view.disabled_commands)}" for c in SWITCHABLE_COMMANDS
        ),
        styles=", ".join(sorted(view.disabled_styles)) or text(language, "settings.none"),
        policy=policy_names[current_policy],
        spoilers=state(view.spoilers),
        quota=quota if quota is not None else text(language, "settings.unlimited"),
    )
    return body, keyboard(language, rows)


async def settings(update: Update, context: BotContext) -> None:
    message, chat = update.effective_message, update.effective_chat
    if message is None or chat is None:
        return
    if chat.type == ChatType.PRIVATE:
        await _reply(message, update, "settings.groups_only")
        return
    actor = await actor_of(update, context)
    moderation = context.services.moderation
    try:
        await asyncio.to_thread(moderation.check, actor, Permission.GROUP_SETTINGS, "settings")
    except CommandError:
        await _reply(message, update, "settings.admins_only")
        return
    body, markup = await asyncio.to_thread(_settings_view, update, context, chat.id)
    await message.reply_text(body, reply_markup=markup)


async def on_admin_button(update: Update, context: BotContext) -> None:
    """A press in /settings (group admins) or on a report's card (bot admins)."""
    from chitrakar.buttons import InvalidButton, parse_button

    query = update.callback_query
    if query is None:
        return
    language = language_of(update)
    try:
        press = parse_button(query.data)
    except InvalidButton:
        await _answer(query, text(language, "button.invalid"), alert=True)
        return
    actor = await actor_of(update, context)
    try:
        if press.action == Action.SETTING:
            await _change_setting(update, context, actor, press.value or "")
        elif press.action == Action.REVIEW:
            await _review(update, context, actor, press)
    except CommandError as exc:
        await _answer(query, text(language, exc.key, **exc.params), alert=True)


async def _answer(query: object, message: str | None = None, alert: bool = False) -> None:
    from telegram import CallbackQuery

    assert isinstance(query, CallbackQuery)
    try:
        await query.answer(message, show_alert=alert)
    except TelegramError as exc:
        log.info("could not answer callback query %s: %s", query.id, exc)


async def _change_setting(update: Update, context: BotContext, actor: Actor, value: str) -> None:
    query, chat = update.callback_query, update.effective_chat
    assert query is not None and chat is not None
    kind, _, choice = value.partition(":")
    if kind in ("c", "s"):
        choice, _, wanted = choice.rpartition(":")
        switch = (choice, wanted == "on")
    moderation = context.services.moderation
    unknown_style = kind == "s" and context.services.intake.catalogue.get(choice) is None
    if (kind == "c" and choice not in SWITCHABLE_COMMANDS) or unknown_style:
        await _answer(query, text(language_of(update), "button.invalid"), alert=True)
        return
    change: dict[str, object]
    if kind == "c":
        change = {"command": switch}
    elif kind == "s":
        change = {"style": switch}
    elif kind == "p":
        change = {"content_policy": None if choice == "default" else choice}
    elif kind == "x":
        change = {"spoilers": choice == "on"}
    else:
        change = {"group_quota": None if choice == "off" else int(choice)}
    try:
        await asyncio.to_thread(lambda: moderation.change_settings(actor, **change))  # type: ignore[arg-type]
    except NotAllowed:
        # A member pressing a group admin's buttons: these are the group's, not the bot's.
        raise NotAllowed("settings.admins_only") from None
    await _answer(query)
    body, markup = await asyncio.to_thread(_settings_view, update, context, chat.id)
    if query.message is not None:
        try:
            await context.bot.edit_message_text(
                body, chat_id=chat.id, message_id=query.message.message_id, reply_markup=markup
            )
        except TelegramError as exc:
            log.info("could not update the settings message: %s", exc)


async def report(update: Update, context: BotContext) -> None:
    """`/report` as a reply to a result: the bot's admins get a review card."""
    message = update.effective_message
    if message is None:
        return
    replied = _replied_to(message)
    if replied is None:
        await _reply(message, update, "report.usage")
        return
    actor = await actor_of(update, context)
    moderation = context.services.moderation
    try:
        opened, job = await asyncio.to_thread(moderation.report, actor, replied.message_id)
    except CommandError as exc:
        await _reply(message, update, exc.key, **exc.params)
        return
    report_id = opened.id
    admins = sorted(context.services.settings.bot_admins)
    if not admins:
        log.warning("report %s has no one to go to: CHITRAKAR_ADMIN_IDS is empty", report_id)
        await _reply(message, update, "report.no_reviewers")
        return
    if not opened.created:
        # The reporter's open report on it was found again: its cards went out already.
        await _reply(message, update, "report.already_sent")
        return
    # The cards first: once the report is open, a repeated /report sends none, so a failed
    # answer to the reporter must not keep them from the admins.
    for admin_id in admins:
        card = text(
            DEFAULT_LANGUAGE,
            "report.card",
            report=report_id,
            job=job.id,
            chat=job.chat_id,
            requester=job.requester,
            reporter=actor.user_id,
            prompt=job.plan.prompt[:300],
        )
        markup = keyboard(DEFAULT_LANGUAGE, review_buttons(report_id))
        try:
            if job.result_file_ids:
                await context.bot.send_photo(
                    int(admin_id), job.result_file_ids[0], caption=card, reply_markup=markup
                )
            else:
                await context.bot.send_message(int(admin_id), card, reply_markup=markup)
        except TelegramError as exc:
            # An admin who never opened a chat with the bot cannot be written to.
            log.warning("could not send report %s to admin %s: %s", report_id, admin_id, exc)
    try:
        await _reply(message, update, "report.sent")
    except TelegramError as exc:
        # The report went to the admins: no "something went wrong" for it.
        log.info("could not tell the reporter of report %s it was sent: %s", report_id, exc)


async def _review(update: Update, context: BotContext, actor: Actor, press: ButtonPress) -> None:
    query = update.callback_query
    assert query is not None and press.job_id is not None and press.value is not None
    language = language_of(update)
    moderation = context.services.moderation
    review = await asyncio.to_thread(moderation.review, actor, press.job_id, press.value)
    if review is None:
        await _answer(query, text(language, "report.already_decided"), alert=True)
        return
    left_in_chat = 0
    if review.job is not None:
        for message_id in review.delete_messages:
            try:
                await context.bot.delete_message(review.job.chat_id, message_id)
            except TelegramError as exc:
                # Telegram lets a bot delete only recent messages (48 hours in most chats).
                log.warning("could not delete message %s: %s", message_id, exc)
                left_in_chat += 1
    decision = text(language, DECISION_NAMES.get(press.value, "report.decision_dismissed"))
    decided = {"report": press.job_id, "decision": decision, "admin": actor.user_id}
    if left_in_chat:
        # The files are gone, but the admin must know the image is still in the chat.
        answer = text(language, "report.decided_left_in_chat", count=left_in_chat, **decided)
        await _answer(query, answer, alert=True)
    else:
        await _answer(query, text(language, "report.decided", **decided))
    if query.message is not None:
        try:
            await context.bot.edit_message_reply_markup(
                chat_id=query.message.chat.id, message_id=query.message.message_id
            )
        except TelegramError as exc:
            log.info("could not clear the review buttons: %s", exc)
