"""The Telegram bot: its handlers and command menu, on the services `bootstrap` wires."""

from __future__ import annotations

import logging
import re

from telegram import BotCommand, Update
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)

from bot import admin, handlers
from bot.bootstrap import BotServices, bootstrap
from bot.context import BotApplication, BotContext, TogetherCalls
from chitrakar.admin_commands import ADMIN_COMMANDS
from chitrakar.bot_api_http import AiohttpRequest
from chitrakar.config import Settings
from chitrakar.domain import MENU, Command
from chitrakar.texts import DEFAULT_LANGUAGE, LANGUAGES, text

log = logging.getLogger(__name__)

# A photo or an image file whose caption is `/avatar …` (or `/avatar@bot …`).
AVATAR_CAPTION = re.compile(r"^/avatar(?:@\w+)?(?:\s|$)", re.IGNORECASE)


async def register_commands(application: BotApplication) -> None:
    """Set the command menu in every language (Telegram picks one by the user's language)."""
    for language in LANGUAGES:
        commands = [BotCommand(command, text(language, f"menu.{command}")) for command in MENU]
        code = None if language == DEFAULT_LANGUAGE else language
        await application.bot.set_my_commands(commands, language_code=code)
    log.info("bot @%s is up", application.bot.username)


def build_application(settings: Settings, services: BotServices | None = None) -> BotApplication:
    """The Telegram bot: python-telegram-bot's application with every handler, on the
    services of `bootstrap` (made here when not given)."""
    if settings.telegram_token is None:
        raise RuntimeError("CHITRAKAR_TELEGRAM_TOKEN is not set")
    services = services or bootstrap(settings)

    application: BotApplication = (
        Application.builder()
        .token(settings.telegram_token.get_secret_value())
        .base_url(settings.telegram_api_url)
        .base_file_url(settings.telegram_file_url)
        .request(AiohttpRequest())
        # Long polls one at a time, as python-telegram-bot's own client for them does.
        .get_updates_request(AiohttpRequest(connection_pool_size=1))
        .context_types(ContextTypes(context=BotContext))
        # Handle updates from different chats at once; each handler awaits its own I/O.
        .concurrent_updates(True)
        .post_init(register_commands)
        .build()
    )
    application.bot_data["services"] = services
    application.bot_data["calls"] = TogetherCalls.of(services)
    # Before everything else: commands sent on behalf of a chat (as a channel), then a banned
    # user's commands and presses, go no further; every entry path below is behind them.
    application.add_handler(TypeHandler(Update, admin.sender_gate), group=-2)
    application.add_handler(TypeHandler(Update, admin.ban_gate), group=-1)
    # New messages only: editing a sent command must not queue a second job.
    new_messages = filters.UpdateType.MESSAGE
    application.add_handler(CommandHandler(Command.START, handlers.start, new_messages))
    application.add_handler(CommandHandler(Command.HELP, handlers.help_command, new_messages))
    application.add_handler(CommandHandler(Command.PORTRAIT, handlers.portrait, new_messages))
    application.add_handler(CommandHandler(Command.AVATAR, handlers.avatar, new_messages))
    application.add_handler(CommandHandler(Command.STYLES, handlers.styles, new_messages))
    application.add_handler(CommandHandler(Command.QUOTA, handlers.quota, new_messages))
    application.add_handler(CommandHandler(Command.CANCEL, handlers.cancel, new_messages))
    application.add_handler(CommandHandler(Command.HISTORY, handlers.history, new_messages))
    application.add_handler(CommandHandler(Command.PRIVACY, handlers.privacy, new_messages))
    application.add_handler(CommandHandler(Command.EXPORT, handlers.export, new_messages))
    application.add_handler(CommandHandler(Command.FORGET, handlers.forget, new_messages))
    application.add_handler(CommandHandler(Command.GROUP_QUOTA, handlers.group_quota, new_messages))
    # Videos and GIFs are caught too, to be told that a still photo is needed.
    pictures = filters.PHOTO | filters.Document.ALL | filters.ANIMATION | filters.VIDEO
    application.add_handler(
        MessageHandler(
            new_messages & pictures & filters.CaptionRegex(AVATAR_CAPTION), handlers.avatar
        )
    )
    application.add_handler(
        MessageHandler(
            new_messages
            & (filters.PHOTO | filters.Document.IMAGE)
            & ~filters.CaptionRegex(AVATAR_CAPTION),
            handlers.photo_without_avatar,
        )
    )
    for command in ADMIN_COMMANDS:
        application.add_handler(CommandHandler(command, admin.admin_command, new_messages))
    application.add_handler(CommandHandler(Command.SETTINGS, admin.settings, new_messages))
    application.add_handler(CommandHandler(Command.REPORT, admin.report, new_messages))
    application.add_handler(MessageHandler(filters.StatusUpdate.MIGRATE, admin.chat_migrated))
    application.add_handler(
        MessageHandler(filters.UpdateType.EDITED_MESSAGE, handlers.edited_command)
    )
    application.add_handler(CallbackQueryHandler(admin.on_admin_button, pattern=r"^[gw]:"))
    application.add_handler(CallbackQueryHandler(handlers.on_button))
    application.add_error_handler(handlers.on_error)
    return application
