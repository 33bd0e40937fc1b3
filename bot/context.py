"""Dependencies handed to every handler through python-telegram-bot's context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from telegram import Update
from telegram.ext import Application, CallbackContext, ExtBot

from chitrakar.config import Settings
from chitrakar.moderation import Moderation
from chitrakar.privacy import PrivacyService
from chitrakar.services import JobIntake
from chitrakar.texts import pick_language
from db.jobs import Origin

CHANNEL = "telegram"


@dataclass(frozen=True)
class BotServices:
    settings: Settings
    intake: JobIntake
    privacy: PrivacyService
    moderation: Moderation


class BotContext(CallbackContext[ExtBot[None], dict[Any, Any], dict[Any, Any], dict[Any, Any]]):
    @property
    def services(self) -> BotServices:
        services: BotServices = self.application.bot_data["services"]
        return services


BotApplication = Application[
    ExtBot[None], BotContext, dict[Any, Any], dict[Any, Any], dict[Any, Any], Any
]


def language_of(update: Update) -> str:
    user = update.effective_user
    return pick_language(user.language_code if user else None)


def origin_of(update: Update, language: str, trigger: str | None = None) -> Origin:
    """Where a request came from. A button press passes its own trigger; its message (the
    result it sits under) is what the answer replies to."""
    chat, user, message = update.effective_chat, update.effective_user, update.effective_message
    assert chat is not None and user is not None
    return Origin(
        channel=CHANNEL,
        chat_id=chat.id,
        chat_type=chat.type,
        user_external_id=str(user.id),
        user_display_name=user.full_name,
        language=language,
        request_message_id=message.message_id if message is not None else None,
        trigger=trigger,
    )
