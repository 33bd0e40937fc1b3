"""Dependencies handed to every handler through python-telegram-bot's context."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from telegram import Message, Update
from telegram.constants import ChatType
from telegram.error import TelegramError
from telegram.ext import Application, CallbackContext, ExtBot

from bot.bootstrap import CHANNEL, BotServices
from bot.coalescing import Coalesced
from bot.intake_process import IN_THE_INTAKE_PROCESS, INTAKE_CALLS, IntakeProcess
from chitrakar.domain import CommandError, ImageRequest
from chitrakar.moderation import Actor
from chitrakar.permissions import Sender, sender_kind
from chitrakar.services import Accepted
from chitrakar.texts import pick_language
from db.jobs import Origin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TogetherCalls:
    """The calls every command makes, each made once for the commands that arrive in one turn
    of the event loop (bot.coalescing): the ban check, taking a request in, publishing its
    job, and recording its status message. Made in the bot's threads; with an intake process
    (bot.intake_process), all but the publishing are made there."""

    is_banned: Coalesced[str, bool]
    accept: Coalesced[tuple[Origin, ImageRequest], Accepted]
    accept_again: Coalesced[tuple[Origin, ImageRequest], Accepted]
    dispatch: Coalesced[Accepted, bool]
    attach_status_message: Coalesced[tuple[int, int], bool]

    @classmethod
    def of(cls, services: BotServices) -> TogetherCalls:
        executor = services.intake_process

        def made(name: str) -> Coalesced[Any, Any]:
            if executor is None or name not in IN_THE_INTAKE_PROCESS:
                return Coalesced(partial(INTAKE_CALLS[name], services))
            return Coalesced(IntakeProcess.call(name), executor=executor)

        return cls(
            is_banned=made("is_banned"),
            accept=made("accept"),
            accept_again=made("accept_again"),
            dispatch=made("dispatch"),
            attach_status_message=made("attach_status_message"),
        )


async def taken_in(take_in: Callable[[bool], Awaitable[Accepted]]) -> Accepted:
    """A request taken in by `take_in(asked_before)`, asked once more when the first asking
    failed other than by a refusal (a CommandError, its user's to hear). Whether that asking
    wrote the job cannot be known: the intake process may have died with it in hand, or a
    commit's answer been lost. Asked again, the intake answers a job it finds for the
    request, waiting and unanswered, which nobody else would answer before the reconciler
    (CHITRAKAR_REPUBLISH_AFTER) ran it for a user told that it had failed."""
    try:
        return await take_in(False)
    except CommandError:
        raise
    except Exception:
        log.warning("a request's intake failed; asking once more", exc_info=True)
    return await take_in(True)


class BotContext(CallbackContext[ExtBot[None], dict[Any, Any], dict[Any, Any], dict[Any, Any]]):
    @property
    def services(self) -> BotServices:
        services: BotServices = self.application.bot_data["services"]
        return services

    @property
    def calls(self) -> TogetherCalls:
        calls: TogetherCalls = self.application.bot_data["calls"]
        return calls


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
        # A plain str, not python-telegram-bot's enum: an Origin crosses to the intake
        # process, which would otherwise import python-telegram-bot (0.15 s) to read it.
        chat_type=str(chat.type),
        user_external_id=str(user.id),
        user_display_name=user.full_name,
        language=language,
        request_message_id=message.message_id if message is not None else None,
        trigger=trigger,
    )


# How long Telegram's answer to "is this user a group admin?" is trusted.
ADMIN_CACHE_S = 60.0
ADMIN_CACHE_SIZE = 10_000


async def is_group_admin(context: BotContext, chat_id: int, user_id: int) -> bool:
    """Telegram's word on it, cached briefly (admins change rarely; every button asks)."""
    if chat_id == user_id:
        return False
    cache: dict[tuple[int, int], tuple[float, bool]] = context.bot_data.setdefault(
        "admin_cache", {}
    )
    cached = cache.get((chat_id, user_id))
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    try:
        member = await context.bot.get_chat_member(chat_id, user_id)
        answer = member.status in ("administrator", "creator")
    except TelegramError as exc:
        log.warning("could not look up user %s in chat %s: %s", user_id, chat_id, exc)
        return False
    now = time.monotonic()
    if len(cache) > ADMIN_CACHE_SIZE:
        for key in [k for k, (expires, _) in cache.items() if expires <= now]:
            del cache[key]
    cache[(chat_id, user_id)] = (now + ADMIN_CACHE_S, answer)
    return answer


def sender_of(update: Update) -> Sender:
    """Who sent a new message (`sender_of_message`); a button press is always a person's."""
    return sender_of_message(update.message) if update.message is not None else Sender.PERSON


def sender_of_message(message: Message) -> Sender:
    """Who sent a message: a person, or someone on behalf of a chat."""
    sender_chat = message.sender_chat
    return sender_kind(
        message.chat_id,
        sender_chat.id if sender_chat is not None else None,
        bool(message.is_automatic_forward),
    )


async def actor_of(update: Update, context: BotContext) -> Actor:
    chat, user = update.effective_chat, update.effective_user
    assert chat is not None and user is not None
    # Posting as the group itself is for its admins only: Telegram vouches for them.
    group_admin = chat.type != ChatType.PRIVATE and (
        sender_of(update) == Sender.ANONYMOUS_ADMIN
        or await is_group_admin(context, chat.id, user.id)
    )
    role = context.services.moderation.role_of(str(user.id), group_admin)
    return Actor(channel=CHANNEL, user_id=str(user.id), role=role, chat_id=chat.id)
