"""Sending results back to the chat from the worker, through the Bot API.

The worker talks to Telegram itself (the bot process only takes requests in). python-telegram-bot
is async; Celery tasks are not, so one event loop runs in a background thread of the worker
process and tasks hand it coroutines.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from time import monotonic
from typing import Any, TypeVar

from PIL import Image
from telegram import (
    Bot,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    Message,
    ReplyParameters,
)
from telegram.constants import ChatAction
from telegram.error import BadRequest, NetworkError, RetryAfter, TelegramError

from chitrakar.bot_api_http import AiohttpRequest
from chitrakar.buttons import labelled, result_buttons, style_buttons
from chitrakar.config import Settings
from chitrakar.domain import JobKind, ProgressThrottle
from chitrakar.styles import StyleCatalogue
from chitrakar.texts import text
from db.jobs import JobView
from workers.outbound import Delivered, result_caption

log = logging.getLogger(__name__)
T = TypeVar("T")

CHANNEL = "telegram"

# Read and write timeouts of one upload; a delivery with its retries gets the longer deadline.
UPLOAD_TIMEOUT_S = 60.0
DELIVERY_DEADLINE_S = 600.0
# How often a send is retried after Telegram's "429 Too Many Requests", and the longest wait.
FLOOD_RETRIES = 3
MAX_RETRY_AFTER_S = 120.0
# The waits before each new try after a 5xx or a network error.
SERVER_ERROR_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0)
# sendPhoto refuses uploads over 10 MB; a photo is sent at the first quality that fits.
PHOTO_UPLOAD_LIMIT = 10 * 1024 * 1024
PHOTO_QUALITIES = (95, 85, 75)
# How long a final message waits for a progress edit still on its way.
EDIT_SETTLE_S = 10.0


class BackgroundLoop:
    """An asyncio loop in a daemon thread, for code that is not async itself."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run to completion; on timeout the coroutine is cancelled, not left running."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


_UPLOAD_TIMEOUTS: dict[str, Any] = {
    "read_timeout": UPLOAD_TIMEOUT_S,
    "write_timeout": UPLOAD_TIMEOUT_S,
}


def _keyboard(language: str, rows: list[list[Any]]) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [
            [InlineKeyboardButton(label, callback_data=data) for label, data in row]
            for row in labelled(language, rows)
        ]
    )


def _as_photo(image: Image.Image) -> bytes:
    """What sendPhoto uploads: a JPEG at quality 95. Telegram turns every photo into a JPEG of
    its own, so the PNG only made the upload bigger: at 1024×1024 a photograph's PNG is 1,390
    KiB, this 256 KiB, encoded in 2–3 ms. The PNG stays in the store, for the file button. An
    image too big for the 10 MB limit at that quality (a large upscale) is sent at a lower."""
    rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
    for quality in PHOTO_QUALITIES:
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= PHOTO_UPLOAD_LIMIT:
            break
    return buffer.getvalue()


def _largest_photo_id(message: Message) -> str:
    return max(message.photo, key=lambda p: p.width).file_id


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


async def _quietly(coro: Coroutine[Any, Any, Any]) -> None:
    """Await a call whose failure must not fail the job (status edits, chat actions)."""
    try:
        await coro
    except TelegramError as exc:
        log.warning("Bot API call failed, carrying on: %s", exc)


async def _respecting_flood_limits(send: Callable[[], Awaitable[T]]) -> T:
    """Send, and after a 429 wait as long as Telegram asks and send again; after a 5xx or a
    network error wait a little longer each time and send again. A refusal (400, 403) is
    final. (A send that timed out after Telegram took it may arrive twice: a result is never
    dropped, and rarely duplicated.)"""
    flood_waits = 0
    for backoff in (*SERVER_ERROR_BACKOFF_S, None):
        try:
            return await send()
        except RetryAfter as exc:
            flood_waits += 1
            if flood_waits >= FLOOD_RETRIES:
                raise
            wait = min(_seconds(exc.retry_after), MAX_RETRY_AFTER_S)
            log.warning("Telegram asked to wait %.0f s (attempt %d)", wait, flood_waits)
        except BadRequest:
            raise
        except NetworkError as exc:  # 5xx, a dropped connection, a timeout
            if backoff is None:
                raise
            wait = backoff
            log.warning("Bot API unreachable (%s); sending again in %.0f s", exc, wait)
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")


class TelegramDelivery:
    """What a worker says in a Telegram chat about a job: progress, the result, or an apology."""

    def __init__(self, settings: Settings, catalogue: StyleCatalogue) -> None:
        self._catalogue = catalogue
        if settings.telegram_token is None:
            raise RuntimeError("CHITRAKAR_TELEGRAM_TOKEN is not set: the worker cannot deliver")
        self._loop = BackgroundLoop("telegram-delivery")
        self._bot = Bot(
            settings.telegram_token.get_secret_value(),
            base_url=settings.telegram_api_url,
            base_file_url=settings.telegram_file_url,
            request=AiohttpRequest(),
        )
        try:
            # Opens the HTTP connection pool and checks the token with getMe.
            self._loop.run(self._bot.initialize(), timeout=60)
        except TelegramError as exc:
            log.warning("the Bot API did not answer getMe (%s); will try again per delivery", exc)
        self._progress_interval = settings.progress_interval
        self._selfies_kept = settings.input_retention_hours > 0
        # Per job in progress: its throttle, and its status edit still on the way, if any.
        self._throttles: dict[int, ProgressThrottle] = {}
        self._edits: dict[int, Future[None]] = {}
        # Per job being checked and stored: its "uploading a photo" action on the way.
        self._uploading: dict[int, Future[None]] = {}

    def close(self) -> None:
        try:
            self._loop.run(self._bot.shutdown(), timeout=10)
        finally:
            self._loop.close()

    @staticmethod
    def _reply_to(job: JobView) -> ReplyParameters | None:
        if job.request_message_id is None:
            return None
        return ReplyParameters(job.request_message_id, allow_sending_without_reply=True)

    def _edit_status(self, job: JobView, key: str, **params: Any) -> None:
        """Edit the job's status message without waiting. Dropped while throttled or while the
        previous edit is still on its way: only the latest state is worth showing."""
        if job.status_message_id is None:
            return
        previous = self._edits.get(job.id)
        if previous is not None and not previous.done():
            return
        throttle = self._throttles.setdefault(job.id, ProgressThrottle(self._progress_interval))
        if not throttle.allow(monotonic()):
            return
        self._edits[job.id] = self._loop.submit(
            _quietly(
                self._bot.edit_message_text(
                    text(job.language, key, **params),
                    chat_id=job.chat_id,
                    message_id=job.status_message_id,
                )
            )
        )

    def _settle(self, job: JobView) -> None:
        """Forget the job's progress state, after its last edit has landed, so that no late
        progress edit overwrites what comes next. Idempotent."""
        self._throttles.pop(job.id, None)
        # An "uploading a photo" action still on its way (the job was then blocked or failed)
        # lands first too: a notice sent as a new message then ends it in the client.
        for pending in (self._edits.pop(job.id, None), self._uploading.pop(job.id, None)):
            if pending is not None:
                with contextlib.suppress(Exception):
                    pending.result(EDIT_SETTLE_S)

    def stop_progress(self, job: JobView) -> None:
        """The job stopped without a result to send (cancelled): forget its progress."""
        self._settle(job)

    def started(self, job: JobView) -> None:
        self._edit_status(job, "status.running")

    def progress(self, job: JobView, done: int, total: int) -> None:
        self._edit_status(job, "status.progress", percent=round(100 * done / max(total, 1)))

    def uploading(self, job: JobView) -> None:
        # Sent while the images are checked and stored, so that its round trip (100 ms or
        # more across the internet) is not one more wait before the photo.
        self._uploading[job.id] = self._loop.submit(
            _quietly(self._bot.send_chat_action(job.chat_id, ChatAction.UPLOAD_PHOTO))
        )

    def deliver(
        self, job: JobView, images: Sequence[Image.Image], seconds: float, spoiler: bool = False
    ) -> Delivered:
        """Send the images as a reply to the request (under a spoiler when asked) and remove
        the status message. Raises when the images could not be sent."""
        # Encoded here, in the worker's thread: the loop carries every job's Bot API calls.
        photos = [_as_photo(image) for image in images]
        announced = self._uploading.pop(job.id, None)
        self._settle(job)
        return self._loop.run(
            self._deliver(job, photos, seconds, spoiler, announced), DELIVERY_DEADLINE_S
        )

    async def _deliver(
        self,
        job: JobView,
        photos: Sequence[bytes],
        seconds: float,
        spoiler: bool,
        announced: Future[None] | None,
    ) -> Delivered:
        captions = [result_caption(self._catalogue, job, seed, seconds) for seed in job.plan.seeds]
        rows = result_buttons(job.id, job.kind, len(photos), selfie_kept=self._selfies_kept)
        keyboard = _keyboard(job.language, rows)
        # The chat action lands first: arriving after the photo, a client would show "sending
        # a photo" under it for 5 s.
        if announced is None:
            await _quietly(self._bot.send_chat_action(job.chat_id, ChatAction.UPLOAD_PHOTO))
        else:
            await asyncio.wrap_future(announced)
        if len(photos) == 1:
            sent = [
                await _respecting_flood_limits(
                    lambda: self._bot.send_photo(
                        job.chat_id,
                        photos[0],
                        caption=captions[0],
                        has_spoiler=spoiler,
                        reply_parameters=self._reply_to(job),
                        reply_markup=keyboard,
                        **_UPLOAD_TIMEOUTS,
                    )
                )
            ]
        else:
            sent = list(
                await _respecting_flood_limits(
                    lambda: self._bot.send_media_group(
                        job.chat_id,
                        [
                            InputMediaPhoto(photo, caption=caption, has_spoiler=spoiler)
                            for photo, caption in zip(photos, captions, strict=True)
                        ],
                        reply_parameters=self._reply_to(job),
                        **_UPLOAD_TIMEOUTS,
                    )
                )
            )
            # An album carries no buttons: they come in a message of their own, under it. The
            # images have arrived by now: failing to add the buttons does not fail the job.
            key = "button.avatar_album" if job.kind == JobKind.AVATAR else "button.album"
            await _quietly(
                _respecting_flood_limits(
                    lambda: self._bot.send_message(
                        job.chat_id,
                        text(job.language, key, count=len(photos)),
                        reply_parameters=ReplyParameters(
                            sent[0].message_id, allow_sending_without_reply=True
                        ),
                        reply_markup=keyboard,
                    )
                )
            )
        await self._remove_status(job)
        return Delivered(
            file_ids=[_largest_photo_id(message) for message in sent],
            message_ids=[message.message_id for message in sent],
        )

    def blocked(self, job: JobView) -> None:
        """Tell the user their images were held back by the content check (credits back)."""
        self._notify(job, text(job.language, "moderation.blocked_result"))

    def _notify(self, job: JobView, notice: str) -> None:
        """Put a final word on the job's status message, or else send it as a reply."""
        self._settle(job)
        try:
            self._loop.run(self._replace_status(job, notice), DELIVERY_DEADLINE_S)
        except Exception:
            log.exception("could not tell chat %s about job %s", job.chat_id, job.id)

    async def _replace_status(self, job: JobView, notice: str) -> None:
        if job.status_message_id is not None:
            try:
                await self._bot.edit_message_text(
                    notice, chat_id=job.chat_id, message_id=job.status_message_id
                )
                return
            except TelegramError as exc:
                # The user may have deleted the status message: reply instead.
                log.warning("could not edit the status message of job %s: %s", job.id, exc)
        await _respecting_flood_limits(
            lambda: self._bot.send_message(
                job.chat_id, notice, reply_parameters=self._reply_to(job)
            )
        )

    async def _remove_status(self, job: JobView) -> None:
        if job.status_message_id is not None:
            await _quietly(self._bot.delete_message(job.chat_id, job.status_message_id))

    def deliver_previews(self, job: JobView, grid: Path) -> list[str]:
        """Send the style grid with a button per style."""
        self._settle(job)
        photo = grid.read_bytes()
        return self._loop.run(self._deliver_previews(job, photo), DELIVERY_DEADLINE_S)

    async def _deliver_previews(self, job: JobView, photo: bytes) -> list[str]:
        keyboard = _keyboard(job.language, style_buttons(self._catalogue, job.language))
        sent = await _respecting_flood_limits(
            lambda: self._bot.send_photo(
                job.chat_id,
                photo,
                caption=text(job.language, "styles.grid_caption"),
                reply_parameters=self._reply_to(job),
                reply_markup=keyboard,
                **_UPLOAD_TIMEOUTS,
            )
        )
        await self._remove_status(job)
        return [_largest_photo_id(sent)]

    def apologise(self, job: JobView) -> None:
        """Tell the user their job failed: on the status message, or else as a reply."""
        self._notify(job, text(job.language, "error.generation_failed", job_id=job.id))
