"""Sending results back to the chat from the worker, through the Bot API.

The worker talks to Telegram itself (the bot process only takes requests in). python-telegram-bot
is async; Celery tasks are not, so one event loop runs in a background thread of the worker
process and tasks hand it coroutines.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from time import monotonic
from typing import Any, TypeVar

from telegram import Bot, InputMediaPhoto, ReplyParameters
from telegram.constants import ChatAction
from telegram.error import TelegramError

from chitrakar.config import Settings
from chitrakar.domain import ProgressThrottle
from chitrakar.texts import text
from db.jobs import JobView

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds to wait for one Bot API call to finish before giving up on it.
SEND_TIMEOUT_S = 120.0


class BackgroundLoop:
    """An asyncio loop in a daemon thread, for code that is not async itself."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = SEND_TIMEOUT_S) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


class TelegramDelivery:
    """What a worker says in a Telegram chat about a job: progress, the result, or an apology."""

    def __init__(self, settings: Settings) -> None:
        if settings.telegram_token is None:
            raise RuntimeError("CHITRAKAR_TELEGRAM_TOKEN is not set: the worker cannot deliver")
        self._loop = BackgroundLoop("telegram-delivery")
        self._bot = Bot(
            settings.telegram_token.get_secret_value(),
            base_url=settings.telegram_api_url,
            base_file_url=settings.telegram_file_url,
        )
        try:
            # Opens the HTTP connection pool and checks the token with getMe.
            self._loop.run(self._bot.initialize(), timeout=60)
        except TelegramError as exc:
            log.warning("the Bot API did not answer getMe (%s); will try again per delivery", exc)
        self._progress_interval = settings.progress_interval
        self._throttles: dict[int, ProgressThrottle] = {}
        self._edit_in_flight: dict[int, Future[Any]] = {}

    def close(self) -> None:
        try:
            self._loop.run(self._bot.shutdown(), timeout=10)
        finally:
            self._loop.close()

    def _throttle(self, chat_id: int) -> ProgressThrottle:
        return self._throttles.setdefault(chat_id, ProgressThrottle(self._progress_interval))

    def _edit_status(self, job: JobView, key: str, **params: Any) -> None:
        """Edit the job's status message without waiting; dropped while throttled or while the
        previous edit in this chat is still on its way, since only the latest state matters."""
        if job.status_message_id is None:
            return
        previous = self._edit_in_flight.get(job.chat_id)
        if previous is not None and not previous.done():
            return
        if not self._throttle(job.chat_id).allow(monotonic()):
            return
        future = self._loop.submit(
            self._quietly(
                self._bot.edit_message_text(
                    text(job.language, key, **params),
                    chat_id=job.chat_id,
                    message_id=job.status_message_id,
                )
            )
        )
        self._edit_in_flight[job.chat_id] = future

    @staticmethod
    async def _quietly(coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except TelegramError as exc:
            log.warning("status edit failed: %s", exc)

    def started(self, job: JobView) -> None:
        self._edit_status(job, "status.running")

    def progress(self, job: JobView, done: int, total: int) -> None:
        self._edit_status(job, "status.progress", percent=round(100 * done / max(total, 1)))

    def deliver(self, job: JobView, images: Sequence[Path], seconds: float) -> list[str]:
        """Send the images as a reply to the request and remove the status message.
        Returns Telegram's file ids. Raises when the images could not be sent."""
        return self._loop.run(self._deliver(job, images, seconds))

    async def _deliver(self, job: JobView, images: Sequence[Path], seconds: float) -> list[str]:
        plan = job.plan
        captions = [
            text(
                job.language,
                "result.caption",
                seed=seed,
                steps=plan.steps,
                width=plan.width,
                height=plan.height,
                seconds=seconds,
            )
            for seed in plan.seeds
        ]
        reply = (
            ReplyParameters(job.request_message_id, allow_sending_without_reply=True)
            if job.request_message_id is not None
            else None
        )
        await self._bot.send_chat_action(job.chat_id, ChatAction.UPLOAD_PHOTO)
        if len(images) == 1:
            message = await self._bot.send_photo(
                job.chat_id,
                images[0].read_bytes(),
                caption=captions[0],
                reply_parameters=reply,
                read_timeout=SEND_TIMEOUT_S,
                write_timeout=SEND_TIMEOUT_S,
            )
            sent = [message]
        else:
            media = [
                InputMediaPhoto(path.read_bytes(), caption=caption)
                for path, caption in zip(images, captions, strict=True)
            ]
            sent = list(
                await self._bot.send_media_group(
                    job.chat_id,
                    media,
                    reply_parameters=reply,
                    read_timeout=SEND_TIMEOUT_S,
                    write_timeout=SEND_TIMEOUT_S,
                )
            )
        if job.status_message_id is not None:
            await self._quietly(self._bot.delete_message(job.chat_id, job.status_message_id))
        return [max(message.photo, key=lambda p: p.width).file_id for message in sent]

    def apologise(self, job: JobView) -> None:
        """Tell the user their job failed: on the status message, or as a reply."""
        apology = text(job.language, "error.generation_failed", job_id=job.id)
        try:
            if job.status_message_id is not None:
                self._loop.run(
                    self._bot.edit_message_text(
                        apology, chat_id=job.chat_id, message_id=job.status_message_id
                    )
                )
                return
            reply = (
                ReplyParameters(job.request_message_id, allow_sending_without_reply=True)
                if job.request_message_id is not None
                else None
            )
            self._loop.run(self._bot.send_message(job.chat_id, apology, reply_parameters=reply))
        except Exception:
            log.exception("could not tell chat %s that job %s failed", job.chat_id, job.id)
