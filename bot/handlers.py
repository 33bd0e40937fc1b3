"""Command handlers: each turns a chat message into a call on the service layer and answers.
Every sentence comes from the text catalogue."""

from __future__ import annotations

import asyncio
import logging

from telegram import Message, MessageEntity, Update
from telegram.error import TelegramError

from bot.context import BotContext, language_of, origin_of
from chitrakar.domain import Command, CommandError, option_limits, parse_image_command
from chitrakar.texts import text

log = logging.getLogger(__name__)


def command_arguments(message: Message) -> str:
    """The text after `/command` or `/command@botname`, as the user typed it."""
    entities = message.parse_entities([MessageEntity.BOT_COMMAND])
    if not entities or message.text is None:
        return ""
    first = min(entities, key=lambda e: e.offset)
    return message.text[len(entities[first]) :].strip()


def _usage(language: str, context: BotContext) -> str:
    return text(
        language,
        "usage.portrait",
        default_steps=context.services.settings.default_steps,
        **option_limits(),
    )


async def start(update: Update, context: BotContext) -> None:
    if update.effective_message:
        await update.effective_message.reply_text(text(language_of(update), "start.text"))


async def help_command(update: Update, context: BotContext) -> None:
    if update.effective_message:
        await update.effective_message.reply_text(
            text(
                language_of(update),
                "help.text",
                bot_username=context.bot.username,
                **option_limits(),
            )
        )


async def portrait(update: Update, context: BotContext) -> None:
    message = update.effective_message
    if message is None:
        return
    language = language_of(update)
    try:
        request = parse_image_command(Command.PORTRAIT, command_arguments(message))
    except CommandError as exc:
        await message.reply_text(
            text(language, exc.key, **exc.params) + "\n\n" + _usage(language, context)
        )
        return

    intake = context.services.intake
    accepted = await asyncio.to_thread(intake.accept, origin_of(update, language), request)
    if accepted.duplicate:
        return
    status: Message | None
    try:
        status = await message.reply_text(
            text(language, "status.queued", position=accepted.position)
        )
    except TelegramError:
        # The job goes on without a status message; the result still comes as a reply.
        log.warning("could not send the status message of job %s", accepted.job_id)
        status = None
    dispatched = await asyncio.to_thread(
        intake.dispatch, accepted.job_id, status.message_id if status else None
    )
    if not dispatched:
        failure = text(language, "error.queue_unavailable")
        if status is not None:
            await status.edit_text(failure)
        else:
            await message.reply_text(failure)


async def on_error(update: object, context: BotContext) -> None:
    """Log with context and tell the user; never leave them with silence or a stack trace."""
    log.error("error while handling update %s", update, exc_info=context.error)
    if isinstance(update, Update) and update.effective_message:
        try:
            await update.effective_message.reply_text(text(language_of(update), "error.unexpected"))
        except TelegramError:
            log.warning("could not send the error reply")
