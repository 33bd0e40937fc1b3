"""Command handlers: each turns a chat message into a call on the service layer and answers.
Every sentence comes from the text catalogue."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from telegram import (
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatType, FileSizeLimit, MessageLimit
from telegram.error import BadRequest, Forbidden, TelegramError
from telegram.ext import ApplicationHandlerStop

from bot.bootstrap import CHANNEL
from bot.context import (
    BotContext,
    actor_of,
    is_group_admin,
    language_of,
    origin_of,
    sender_of_message,
    taken_in,
)
from chitrakar import replies
from chitrakar.buttons import (
    Action,
    Button,
    ButtonPress,
    InvalidButton,
    forget_buttons,
    labelled,
    parse_button,
    style_buttons,
)
from chitrakar.domain import Command, CommandError, option_limits, parse_image_command
from chitrakar.permissions import Permission, Sender
from chitrakar.photos import MAX_DOWNLOAD_BYTES, check_declared_size, prepare_selfie
from chitrakar.services import Accepted
from chitrakar.texts import text
from db.jobs import Origin

log = logging.getLogger(__name__)

# A group's daily credits an admin may set (a typo of 10**9 should not read as "unlimited").
MAX_GROUP_QUOTA = 100_000


def command_arguments(message: Message) -> str:
    """The text after `/command` or `/command@botname` (in a text or a caption), as typed."""
    if message.text is not None:
        entities, body = message.parse_entities([MessageEntity.BOT_COMMAND]), message.text
    else:
        entities = message.parse_caption_entities([MessageEntity.BOT_COMMAND])
        body = message.caption or ""
    if not entities:
        return ""
    first = min(entities, key=lambda e: e.offset)
    return body[first.offset + len(entities[first]) :].strip()


def command_of(message: Message, bot_username: str) -> str | None:
    """The command a text or caption starts with (`/avatar` or `/avatar@bot`), lower case,
    without the slash; None when it starts with none, or names another bot."""
    body = message.text if message.text is not None else message.caption or ""
    if not body.startswith("/"):
        return None
    command, at, username = body.split(maxsplit=1)[0][1:].partition("@")
    if at and username.lower() != bot_username.lower():
        return None
    return command.lower()


_COMMANDS = frozenset(Command)


def own_command(message: Message, bot_username: str) -> Command | None:
    """This bot's command a text or caption starts with; None for none, another bot's (in a
    group, other bots' commands are none of this bot's business) or an unknown one."""
    name = command_of(message, bot_username)
    return Command(name) if name in _COMMANDS else None


def keyboard(language: str, rows: list[list[Button]]) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [
            [InlineKeyboardButton(label, callback_data=data) for label, data in row]
            for row in labelled(language, rows)
        ]
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
        asked = (origin_of(update, language), request)
        accepted = await taken_in(
            lambda again: (context.calls.accept_again if again else context.calls.accept)(asked)
        )
    except CommandError as exc:
        steps = context.services.settings.default_steps
        await message.reply_text(replies.command_error(language, steps, Command.PORTRAIT, exc))
        return
    await _announce_and_dispatch(message, accepted, language, context)


async def _announce_and_dispatch(
    reply_to: Message, accepted: Accepted, language: str, context: BotContext
) -> None:
    await _announce_and_dispatch_to(
        reply_to.chat_id, reply_to.message_id, accepted, language, context
    )


async def _announce_and_dispatch_to(
    chat_id: int, message_id: int, accepted: Accepted, language: str, context: BotContext
) -> None:
    """Hand the job over and, meanwhile, tell the user their place in the queue (replying to
    the message that asked): the job does not wait a Bot API round trip for its status
    message. The message is recorded once sent; if the job ended or its result is on the
    way by then, no worker will remove it, so it is removed here."""
    if accepted.duplicate:
        return
    reply_to = ReplyParameters(message_id, allow_sending_without_reply=True)
    sending = asyncio.create_task(
        context.bot.send_message(
            chat_id,
            text(language, "status.queued", position=accepted.position),
            reply_parameters=reply_to,
        )
    )
    dispatched = await context.calls.dispatch(accepted)
    status: Message | None
    try:
        status = await sending
    except TelegramError:
        # The job goes on without a status message; the result still comes as a reply.
        log.warning("could not send the status message of job %s", accepted.job_id)
        status = None
    if not dispatched:
        failure = text(language, "error.queue_unavailable")
        if status is not None:
            await status.edit_text(failure)
        else:
            await context.bot.send_message(chat_id, failure, reply_parameters=reply_to)
        return
    if status is None:
        return
    try:
        watched = await context.calls.attach_status_message((accepted.job_id, status.message_id))
    except Exception:
        # The job goes on, but no worker will know of the message: it must not stay behind.
        log.exception("could not record the status message of job %s", accepted.job_id)
        watched = False
    if not watched:
        with contextlib.suppress(TelegramError):
            await status.delete()


def _photo_in(message: Message | None) -> tuple[str, int | None] | None:
    """The file id and declared size of the picture in a message: the largest size of a
    photo, or a file sent uncompressed."""
    if message is None:
        return None
    if message.photo:
        largest = message.photo[-1]
        return largest.file_id, largest.file_size
    if message.document is not None:
        return message.document.file_id, message.document.file_size
    return None


async def avatar(update: Update, context: BotContext) -> None:
    """`/avatar <style>` as a photo's caption, or as a reply to a photo."""
    message = update.effective_message
    if message is None:
        return
    language = language_of(update)
    # `/avatar@other_bot` in a caption is for another bot (CommandHandler checks this for
    # texts, but captions come through a message filter).
    if message.text is None and command_of(message, context.bot.username) is None:
        return
    replied = message.reply_to_message
    if any(m is not None and (m.animation or m.video or m.video_note) for m in (message, replied)):
        await message.reply_text(text(language, "photo.animated"))
        return
    photo = _photo_in(message)
    if photo is None and replied is not None:
        photo = _photo_in(replied)
        # Only one's own face: another's would be kept outside their /export and /forget.
        if photo is not None and not _same_sender(message, replied):
            await message.reply_text(text(language, "avatar.not_your_photo"))
            return
    if photo is None:
        await message.reply_text(text(language, "avatar.how"))
        return
    intake = context.services.intake
    try:
        request = parse_image_command(Command.AVATAR, command_arguments(message))
        data = await _download(context, *photo)
        selfie = await asyncio.to_thread(prepare_selfie, data, context.services.settings.image_size)
        origin = origin_of(update, language)
        accepted = await taken_in(
            lambda again: asyncio.to_thread(intake.accept, origin, request, selfie, again)
        )
    except CommandError as exc:
        steps = context.services.settings.default_steps
        await message.reply_text(replies.command_error(language, steps, Command.AVATAR, exc))
        return
    await _announce_and_dispatch(message, accepted, language, context)


def _same_sender(message: Message, other: Message) -> bool:
    """Both sent by one person as themselves (a post on behalf of a chat names no person)."""
    return (
        message.from_user is not None
        and other.from_user is not None
        and message.from_user.id == other.from_user.id
        and sender_of_message(other) == Sender.PERSON
    )


async def _download(context: BotContext, file_id: str, declared_size: int | None) -> bytes:
    """The picture's bytes, refused before download when Telegram says it is too large."""
    check_declared_size(declared_size)
    try:
        telegram_file = await context.bot.get_file(file_id)
        check_declared_size(telegram_file.file_size)
        data = bytes(await telegram_file.download_as_bytearray())
    except BadRequest as exc:
        if "too big" in exc.message.lower():
            raise CommandError("photo.too_large", limit_mb=MAX_DOWNLOAD_BYTES // 2**20) from exc
        log.warning("could not fetch file %s: %s", file_id, exc)
        raise CommandError("photo.download_failed") from exc
    except TelegramError as exc:
        log.warning("could not fetch file %s: %s", file_id, exc)
        raise CommandError("photo.download_failed") from exc
    return data


async def edited_command(update: Update, context: BotContext) -> None:
    """An edited command is not run (it would queue a second job, or run a changed one
    twice): its author is told to send it again, rather than left waiting."""
    message = update.edited_message
    if message is not None and own_command(message, context.bot.username) is not None:
        await message.reply_text(text(language_of(update), "edit.send_again"))


async def photo_without_avatar(update: Update, context: BotContext) -> None:
    """A photo or image file without /avatar. Captioned /portrait (in any chat), it is not
    used: a portrait is made from words alone, and making one would drop the photo unsaid
    (in a group a command in a caption got no answer at all). Sent to the bot in a private
    chat otherwise: how to use it."""
    message, chat = update.effective_message, update.effective_chat
    if message is None or chat is None:
        return
    if own_command(message, context.bot.username) == Command.PORTRAIT:
        key = "photo.portrait_takes_no_photo"
    elif chat.type == ChatType.PRIVATE:
        key = "avatar.hint"
    else:
        return  # a photo shared in a group: none of the bot's business
    await message.reply_text(text(language_of(update), key))


async def styles(update: Update, context: BotContext) -> None:
    """The catalogue: the preview grid when it is made, else a list while it is being made."""
    message = update.effective_message
    if message is None:
        return
    language = language_of(update)
    intake = context.services.intake
    catalogue = intake.catalogue
    markup = keyboard(language, style_buttons(catalogue, language))
    grid = intake.media.grid_path(context.services.settings.model_label, catalogue)
    if await asyncio.to_thread(grid.is_file):
        await message.reply_photo(
            await asyncio.to_thread(grid.read_bytes),
            caption=text(language, "styles.grid_caption"),
            reply_markup=markup,
        )
        return
    listing = replies.styles_listing(language, catalogue, MessageLimit.MAX_TEXT_LENGTH)
    await message.reply_text(listing, reply_markup=markup)
    try:
        accepted = await asyncio.to_thread(intake.request_previews, origin_of(update, language))
    except CommandError as exc:  # paused, say: the listing stands, the previews wait
        await message.reply_text(text(language, exc.key, **exc.params))
        return
    if accepted is not None and not accepted.duplicate:
        await message.reply_text(text(language, "styles.previews_coming"))
        await _announce_and_dispatch(message, accepted, language, context)


async def quota(update: Update, context: BotContext) -> None:
    """Credits left today, what things cost, and when the day turns."""
    message = update.effective_message
    if message is None:
        return
    language = language_of(update)
    intake = context.services.intake
    status = await asyncio.to_thread(intake.quota_status, origin_of(update, language))
    timezone = context.services.settings.timezone
    await message.reply_text(replies.quota_reply(language, status, timezone))


async def cancel(update: Update, context: BotContext) -> None:
    """Stop the user's queued and running jobs in this chat; their credits come back."""
    message = update.effective_message
    if message is None:
        return
    language = language_of(update)
    intake = context.services.intake
    cancelled = await asyncio.to_thread(intake.cancel, origin_of(update, language))
    if not cancelled:
        await message.reply_text(text(language, "cancel.nothing"))
        return
    for job in cancelled:
        if job.status_message_id is not None:
            try:
                await context.bot.edit_message_text(
                    text(job.language, "cancel.status"),
                    chat_id=job.chat_id,
                    message_id=job.status_message_id,
                )
            except TelegramError as exc:
                log.info("could not mark job %s cancelled in the chat: %s", job.id, exc)
    await message.reply_text(replies.cancel_reply(language, cancelled))


async def history(update: Update, context: BotContext) -> None:
    message, user = update.effective_message, update.effective_user
    if message is None or user is None:
        return
    reply, keyboard = await _history_page(update, context, str(user.id), 1)
    await message.reply_text(reply, reply_markup=keyboard)


async def _history_page(
    update: Update, context: BotContext, owner: str, page: int
) -> tuple[str, InlineKeyboardMarkup | None]:
    language = language_of(update)
    origin = origin_of(update, language)
    past, pages = await asyncio.to_thread(context.services.intake.history, origin, page)
    zone = context.services.settings.zone
    reply, rows = replies.history_reply(language, past, page, pages, zone, owner)
    return reply, None if rows is None else keyboard(language, rows)


async def privacy(update: Update, context: BotContext) -> None:
    message = update.effective_message
    if message is None:
        return
    await message.reply_text(replies.privacy_reply(language_of(update), context.services.settings))


async def export(update: Update, context: BotContext) -> None:
    """Everything stored about the user, as a ZIP file."""
    message, user = update.effective_message, update.effective_user
    if message is None or user is None:
        return
    language = language_of(update)
    archive = await asyncio.to_thread(
        context.services.privacy.export_zip, CHANNEL, str(user.id), text(language, "export.readme")
    )
    if archive is None:
        await message.reply_text(text(language, "export.nothing"))
        return
    if len(archive) > FileSizeLimit.FILESIZE_UPLOAD:
        await message.reply_text(text(language, "export.too_large"))
        return
    # Personal data goes to the person: in a group, to their private chat with the bot.
    try:
        await context.bot.send_document(
            user.id,
            archive,
            filename=f"chitrakar-{user.id}.zip",
            caption=text(language, "export.caption"),
        )
    except Forbidden:
        await message.reply_text(
            text(language, "export.private_first", bot_username=context.bot.username)
        )
        return
    if message.chat.type != ChatType.PRIVATE:
        await message.reply_text(text(language, "export.sent_privately"))


async def forget(update: Update, context: BotContext) -> None:
    """Ask before deleting everything stored about the user."""
    message, user = update.effective_message, update.effective_user
    if message is None or user is None:
        return
    language = language_of(update)
    await message.reply_text(
        text(language, "forget.confirm"),
        reply_markup=keyboard(language, forget_buttons(str(user.id))),
    )


async def _on_owned_press(update: Update, context: BotContext, press: ButtonPress) -> None:
    """History pages and the forget confirmation: only the user they belong to may press."""
    query, user = update.callback_query, update.effective_user
    assert query is not None and user is not None
    language = language_of(update)
    if press.owner != str(user.id):
        await _answer(update, text(language, "button.not_yours"), alert=True)
        return
    if press.action == Action.HISTORY:
        assert press.page is not None
        reply, keyboard = await _history_page(update, context, press.owner, press.page)
        await _answer(update)
        if query.message is not None:
            try:
                await context.bot.edit_message_text(
                    reply,
                    chat_id=query.message.chat.id,
                    message_id=query.message.message_id,
                    reply_markup=keyboard,
                )
            except TelegramError as exc:
                log.info("could not turn the history page: %s", exc)
        return
    if not press.confirm:
        await _answer(update, text(language, "forget.kept"))
        return
    report = await asyncio.to_thread(context.services.privacy.forget, CHANNEL, press.owner)
    await _answer(update)
    done = text(language, "forget.done", jobs=report.jobs, files=report.artifacts + report.inputs)
    if query.message is not None:
        try:
            await context.bot.edit_message_text(
                done, chat_id=query.message.chat.id, message_id=query.message.message_id
            )
            return
        except TelegramError as exc:
            log.info("could not edit the forget confirmation: %s", exc)
    await context.bot.send_message(user.id, done)


async def _resend(
    update: Update, context: BotContext, origin: Origin, press: ButtonPress, admin: bool
) -> None:
    """A past result sent again by Telegram's file ids: no upload, no GPU."""
    job = await asyncio.to_thread(context.services.intake.to_resend, origin, press, admin)
    await _answer(update)
    file_ids = list(job.result_file_ids)
    if len(file_ids) == 1:
        await context.bot.send_photo(origin.chat_id, file_ids[0])
    else:
        await context.bot.send_media_group(
            origin.chat_id, [InputMediaPhoto(file_id) for file_id in file_ids]
        )


async def group_quota(update: Update, context: BotContext) -> None:
    """`/groupquota <credits per day>` or `/groupquota off`, for a group's admins."""
    message, chat, user = update.effective_message, update.effective_chat, update.effective_user
    if message is None or chat is None or user is None:
        return
    language = language_of(update)
    if chat.type == ChatType.PRIVATE:
        await message.reply_text(text(language, "quota.group_only"))
        return
    actor = await actor_of(update, context)
    try:
        await asyncio.to_thread(
            context.services.moderation.check, actor, Permission.GROUP_QUOTA, "group_quota"
        )
    except CommandError:
        await message.reply_text(text(language, "quota.group_admins_only"))
        return
    argument = command_arguments(message).lower()
    limit: int | None
    if argument == "off":
        limit = None
    elif argument.isdecimal() and int(argument) <= MAX_GROUP_QUOTA:
        limit = int(argument)
    else:
        await message.reply_text(text(language, "quota.group_usage"))
        return
    await asyncio.to_thread(context.services.moderation.set_group_quota, actor, limit)
    if limit is None:
        await message.reply_text(text(language, "quota.group_unlimited"))
    else:
        await message.reply_text(text(language, "quota.group_set", limit=limit))


async def _answer(update: Update, text_: str | None = None, alert: bool = False) -> None:
    """Answer a button press. A failed answer (the query too old after a backlog, say) only
    leaves the user's spinner turning a little longer: it must not stop the press's job."""
    query = update.callback_query
    assert query is not None
    try:
        await query.answer(text_, show_alert=alert)
    except TelegramError as exc:
        log.warning("could not answer callback query %s: %s", query.id, exc)


async def on_button(update: Update, context: BotContext) -> None:
    """A press of a button under a result or in the style catalogue."""
    query, chat, user = update.callback_query, update.effective_chat, update.effective_user
    if query is None or chat is None or user is None:
        return
    language = language_of(update)
    intake = context.services.intake
    try:
        press = parse_button(query.data)
    except InvalidButton:
        log.info("unknown callback data %r from user %s", query.data, user.id)
        await _answer(update, text(language, "button.invalid"), alert=True)
        return
    origin = origin_of(update, language, trigger=f"button:{query.id}")
    if press.action in (Action.HISTORY, Action.FORGET):
        await _on_owned_press(update, context, press)
        return
    if press.action == Action.STYLE:
        assert press.style is not None
        style = await asyncio.to_thread(intake.set_default_style, origin, press.style)
        if style is None:
            await _answer(update, text(language, "button.style_unknown"), alert=True)
        else:
            await _answer(update, text(language, "button.style_set", name=style.name_in(language)))
        return
    assert press.job_id is not None
    parent = await asyncio.to_thread(intake.find_job, press.job_id)
    is_admin = (
        parent is not None
        and parent.chat_id == chat.id
        and parent.requester != str(user.id)
        and chat.type != ChatType.PRIVATE
        and await is_group_admin(context, chat.id, user.id)
    )
    try:
        if press.action == Action.PICK:
            await _send_pick(update, context, origin, press, is_admin)
            return
        if press.action == Action.RESEND:
            await _resend(update, context, origin, press, is_admin)
            return
        accepted = await taken_in(
            lambda again: asyncio.to_thread(intake.accept_press, origin, press, is_admin, again)
        )
    except CommandError as exc:  # a refused press, or credits short
        await _answer(update, text(language, exc.key, **exc.params), alert=True)
        return
    if accepted.duplicate:
        return  # a repeated update of a press already answered
    await _answer(update, text(language, "button.queued", position=max(accepted.position, 1)))
    reply_to = origin.request_message_id
    await _announce_and_dispatch_to(chat.id, reply_to or 0, accepted, language, context)


async def _send_pick(
    update: Update, context: BotContext, origin: Origin, press: ButtonPress, admin: bool
) -> None:
    """One image of a result, as a file: full size, uncompressed, for a profile picture."""
    assert press.index is not None
    language = language_of(update)
    job, png = await asyncio.to_thread(context.services.intake.result_to_pick, origin, press, admin)
    await _answer(update)
    await context.bot.send_document(
        job.chat_id,
        png,
        filename=f"chitrakar-{job.id}-{press.index + 1}.png",
        caption=text(
            language,
            "button.pick_caption",
            width=job.plan.width,
            height=job.plan.height,
            seed=job.plan.seeds[press.index],
        ),
        reply_parameters=ReplyParameters(
            origin.request_message_id or 0, allow_sending_without_reply=True
        ),
    )


async def on_error(update: object, context: BotContext) -> None:
    """Log with context and tell the user; never leave them with silence or a stack trace.
    The update then goes no further: python-telegram-bot would otherwise hand it to the
    next group's handlers, so a ban check that failed (group -1) would be followed by the
    command it was to guard, and a second answer."""
    log.error("error while handling update %s", update, exc_info=context.error)
    if isinstance(update, Update) and update.effective_message:
        try:
            await update.effective_message.reply_text(text(language_of(update), "error.unexpected"))
        except TelegramError:
            log.warning("could not send the error reply")
    raise ApplicationHandlerStop
