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
from functools import partial
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
from telegram.error import BadRequest, ChatMigrated, NetworkError, RetryAfter, TelegramError

from chitrakar.bot_api_http import AiohttpRequest
from chitrakar.buttons import labelled, result_buttons, style_buttons
from chitrakar.config import Settings
from chitrakar.domain import JobKind, JobStatus, ProgressThrottle
from chitrakar.styles import StyleCatalogue
from chitrakar.texts import text
from db import jobs
from db.jobs import JobView, RunningState
from db.session import Store
from workers.outbound import Delivered, result_caption

log = logging.getLogger(__name__)
T = TypeVar("T")

CHANNEL = "telegram"

# Read and write timeouts of one upload.
UPLOAD_TIMEOUT_S = 60.0
# The longest a result's send may take, its waits on flood limits and server errors included.
# A 429 is waited out (the full `retry_after`) for as long as this allows.
DELIVERY_DEADLINE_S = 600.0
# What follows a sent result (an album's buttons, the status message's removal) gets this long
# of its own: the user has the images by then, so no wait after them may undo the delivery.
FOLLOW_UP_DEADLINE_S = 60.0
# A final notice (an apology, a blocked result) waits out a flood limit this long at most: a
# batch's notices must not hold its worker for the length of a delivery each.
NOTICE_DEADLINE_S = 120.0
# No wait starts that would end past a deadline, but the send after the last wait needs the
# time of one upload (writing, then reading the answer) on top.
SEND_TIME_S = 2 * UPLOAD_TIMEOUT_S
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
            if future.cancel():
                raise
            # It ended just as the time ran out: what it sent stands.
            return future.result()

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


async def _unless_unchanged(edit: Awaitable[Any]) -> None:
    """An edit that may find the message as it would make it: Telegram refuses that one."""
    try:
        await edit
    except BadRequest as exc:
        if "message is not modified" not in exc.message.lower():
            raise


class FloodWaitPastDeadline(TelegramError):
    """Telegram asks a chat to wait longer than the send has left."""


class FloodLimits:
    """Until when each chat is under Telegram's flood limit, from the last 429 that named it.
    Written on the delivery loop, read by the worker's threads as well."""

    def __init__(self) -> None:
        self._until: dict[int, float] = {}
        self._lock = threading.Lock()

    def note(self, chat_id: int, retry_after: float) -> None:
        with self._lock:
            until = monotonic() + retry_after
            self._until[chat_id] = max(until, self._until.get(chat_id, until))

    def wait_left(self, chat_id: int) -> float:
        """Seconds until the chat may be sent to again; 0 when it may now."""
        with self._lock:
            until = self._until.get(chat_id)
            if until is None:
                return 0.0
            left = until - monotonic()
            if left > 0:
                return left
            del self._until[chat_id]
            return 0.0


class TelegramDelivery:
    """What a worker says in a Telegram chat about a job: progress, the result, or an apology."""

    def __init__(self, settings: Settings, catalogue: StyleCatalogue, store: Store) -> None:
        self._catalogue = catalogue
        # The worker's store: where a progress edit looks whether its job still runs.
        self._store = store
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
            # python-telegram-bot names the token in a refusal's text: it is left out.
            reason = str(exc).replace(settings.telegram_token.get_secret_value(), "(token)")
            log.warning(
                "the Bot API did not answer getMe (%s: %s); will try again per delivery",
                type(exc).__name__,
                reason,
            )
        self._progress_interval = settings.progress_interval
        self._selfies_kept = settings.input_retention_hours > 0
        # Per job in progress: its throttle, and its status edit still on the way, if any.
        self._throttles: dict[int, ProgressThrottle] = {}
        self._edits: dict[int, Future[None]] = {}
        # Jobs a look found no longer running (cancelled, handed back): no more edits.
        self._ended: set[int] = set()
        # Jobs with a status edit sent that no later look found the job still running after:
        # sent as the job was cancelled, it may have landed after the bot's "Cancelled.".
        self._unconfirmed: set[int] = set()
        # Per job being checked and stored: its "uploading a photo" action on the way.
        self._uploading: dict[int, Future[None]] = {}
        self._flood = FloodLimits()
        # Groups that became supergroups, by their old chat id: the new one.
        self._migrated: dict[int, int] = {}

    def close(self) -> None:
        try:
            self._loop.run(self._bot.shutdown(), timeout=10)
        finally:
            self._loop.close()

    def _look(self, job: JobView) -> tuple[bool, RunningState | None]:
        """Whether the database answered, and the job's state now (one read by its id; None:
        the job is gone, its user had everything deleted)."""
        try:
            with self._store.unit_of_work() as uow:
                return True, jobs.running_state(uow, job.id)
        except Exception as exc:  # a status edit must never fail its job
            log.warning("job %s: could not look whether it still runs (%s)", job.id, exc)
            return False, None

    @staticmethod
    def _runs(job: JobView, state: RunningState | None) -> bool:
        """Whether the job still runs where `job` was started (not handed to another worker)."""
        if state is None or state.status != JobStatus.RUNNING:
            return False
        return job.worker is None or state.worker == job.worker

    @staticmethod
    def _reply_to(job: JobView) -> ReplyParameters | None:
        if job.request_message_id is None:
            return None
        return ReplyParameters(job.request_message_id, allow_sending_without_reply=True)

    def _where(self, job: JobView) -> tuple[int, ReplyParameters | None]:
        """The chat the job's messages go to, and what they reply to. A group that became a
        supergroup gets them under its new id, replying to nothing: message ids do not carry
        over."""
        moved_to = self._migrated.get(job.chat_id)
        if moved_to is not None:
            return moved_to, None
        return job.chat_id, self._reply_to(job)

    def _moved(self, job: JobView, chat_id: int, new_chat_id: int) -> None:
        log.warning(
            "job %s: chat %s became supergroup %s; its messages go there",
            job.id,
            chat_id,
            new_chat_id,
        )
        self._migrated[chat_id] = new_chat_id

    async def _quietly(
        self, job: JobView, what: str, call: Awaitable[Any], chat_id: int | None = None
    ) -> None:
        """Await a call whose failure must not fail the job (status edits, chat actions, what
        follows a sent result). A 429 puts the chat's edits off until it is over."""
        chat_id = job.chat_id if chat_id is None else chat_id
        try:
            await call
        except RetryAfter as exc:
            self._flood.note(chat_id, _seconds(exc.retry_after))
            log.warning(
                "job %s: %s in chat %s hit a flood limit, skipped: %s", job.id, what, chat_id, exc
            )
        except ChatMigrated as exc:
            self._moved(job, chat_id, exc.new_chat_id)
        except TelegramError as exc:
            log.warning("job %s: %s in chat %s failed, carrying on: %s", job.id, what, chat_id, exc)

    async def _respecting_limits(
        self, chat_id: int, send: Callable[[], Awaitable[T]], deadline: float, what: str
    ) -> T:
        """Send once the chat is out of its flood limit; after a 429, wait as long as Telegram
        asks and send again, for as long as the deadline allows; after a 5xx or a network
        error, wait a little longer each time and send again. A refusal (400, 403) is final.
        (A send that timed out after Telegram took it may arrive twice: a result is never
        dropped, and rarely duplicated.)"""
        backoffs = iter(SERVER_ERROR_BACKOFF_S)
        while True:
            wait = self._flood.wait_left(chat_id)
            if wait > 0:
                if monotonic() + wait > deadline:
                    raise FloodWaitPastDeadline(
                        f"{what}: chat {chat_id} must wait {wait:.0f} s, past the deadline"
                    )
                await asyncio.sleep(wait)
            try:
                return await send()
            except RetryAfter as exc:
                retry_after = _seconds(exc.retry_after)
                self._flood.note(chat_id, retry_after)
                log.warning(
                    "%s: Telegram asked chat %s to wait %.0f s; sending again then",
                    what,
                    chat_id,
                    retry_after,
                )
            except BadRequest:
                raise
            except NetworkError as exc:  # 5xx, a dropped connection, a timeout
                backoff = next(backoffs, None)
                if backoff is None or monotonic() + backoff > deadline:
                    raise
                log.warning(
                    "%s: Bot API unreachable (%s); sending again in %.0f s", what, exc, backoff
                )
                await asyncio.sleep(backoff)

    async def _send(
        self,
        job: JobView,
        what: str,
        send: Callable[[int, ReplyParameters | None], Awaitable[T]],
        deadline: float,
    ) -> T:
        """Send one of the job's messages to its chat (see `_respecting_limits`); to the
        supergroup its group became, when Telegram says it has."""
        chat_id, reply = self._where(job)
        try:
            return await self._respecting_limits(
                chat_id, lambda: send(chat_id, reply), deadline, what
            )
        except ChatMigrated as exc:
            self._moved(job, chat_id, exc.new_chat_id)
            new_chat_id = exc.new_chat_id
        return await self._respecting_limits(
            new_chat_id, lambda: send(new_chat_id, None), deadline, what
        )

    def _edit_status(self, job: JobView, key: str, **params: Any) -> None:
        """Edit the job's status message without waiting. Dropped while throttled, while the
        chat is under a flood limit, or while the previous edit is still on its way: only the
        latest state is worth showing. Dropped too once the job no longer runs: the worker
        looks for a cancellation only now and then, and an edit sent after it would overwrite
        the bot's "Cancelled." (so each edit first reads the job's state: one read by id, at
        most once per progress interval)."""
        if job.status_message_id is None or job.chat_id in self._migrated:
            return
        if job.id in self._ended:
            return
        previous = self._edits.get(job.id)
        if previous is not None and not previous.done():
            return
        if self._flood.wait_left(job.chat_id) > 0:
            return
        throttle = self._throttles.setdefault(job.id, ProgressThrottle(self._progress_interval))
        if not throttle.allow(monotonic()):
            return
        answered, state = self._look(job)
        if not answered:
            return
        if not self._runs(job, state):
            self._ended.add(job.id)
            return
        # Found running after the previous edit landed: that one came before any cancellation.
        # This one is unconfirmed until the next look.
        self._unconfirmed.add(job.id)
        self._edits[job.id] = self._loop.submit(
            self._quietly(
                job,
                "a status edit",
                self._bot.edit_message_text(
                    text(job.language, key, **params),
                    chat_id=job.chat_id,
                    message_id=job.status_message_id,
                ),
            )
        )

    def _settle(self, job: JobView) -> None:
        """Forget the job's progress state, after its last edit has landed, so that no late
        progress edit overwrites what comes next. Idempotent."""
        self._throttles.pop(job.id, None)
        self._ended.discard(job.id)
        self._unconfirmed.discard(job.id)
        # An "uploading a photo" action still on its way (the job was then blocked or failed)
        # lands first too: a notice sent as a new message then ends it in the client.
        for pending in (self._edits.pop(job.id, None), self._uploading.pop(job.id, None)):
            if pending is not None:
                with contextlib.suppress(Exception):
                    pending.result(EDIT_SETTLE_S)

    def stop_progress(self, job: JobView) -> None:
        """The job stopped without a result to send (cancelled, or handed back): forget its
        progress. A cancelled job's last status edit, sent before the cancellation and landed
        after the bot's "Cancelled." (no later look found the job still running), has
        "Cancelled." put back over it."""
        unconfirmed = job.id in self._unconfirmed
        self._settle(job)
        message_id = job.status_message_id
        if not unconfirmed or message_id is None or job.chat_id in self._migrated:
            return
        _, state = self._look(job)
        if state is None or state.status != JobStatus.CANCELLED:
            return
        edit = self._bot.edit_message_text(
            text(job.language, "cancel.status"), chat_id=job.chat_id, message_id=message_id
        )
        try:
            self._loop.run(
                self._quietly(job, "putting back its cancellation", _unless_unchanged(edit)),
                EDIT_SETTLE_S,
            )
        except Exception:
            log.warning("job %s: could not put back its cancellation", job.id, exc_info=True)

    def started(self, job: JobView) -> None:
        self._edit_status(job, "status.running")

    def progress(self, job: JobView, done: int, total: int) -> None:
        self._edit_status(job, "status.progress", percent=round(100 * done / max(total, 1)))

    async def _upload_action(self, job: JobView) -> None:
        """Show "sending a photo", unless the chat is under a flood limit: the action would
        be refused, and the result waits for the limit anyway."""
        chat_id, _ = self._where(job)
        if self._flood.wait_left(chat_id) > 0:
            return
        action = self._bot.send_chat_action(chat_id, ChatAction.UPLOAD_PHOTO)
        await self._quietly(job, "the upload action", action, chat_id)

    def uploading(self, job: JobView) -> None:
        # Sent while the images are checked and stored, so that its round trip (100 ms or
        # more across the internet) is not one more wait before the photo.
        self._uploading[job.id] = self._loop.submit(self._upload_action(job))

    def deliver(
        self, job: JobView, images: Sequence[Image.Image], seconds: float, spoiler: bool = False
    ) -> Delivered:
        """Send the images as a reply to the request (under a spoiler when asked). Raises when
        they could not be sent. What follows them (an album's buttons, the status message's
        removal) is the returned `follow_up`, which never fails the delivery."""
        # Encoded here, in the worker's thread: the loop carries every job's Bot API calls.
        photos = [_as_photo(image) for image in images]
        captions = [result_caption(self._catalogue, job, seed, seconds) for seed in job.plan.seeds]
        rows = result_buttons(job.id, job.kind, len(photos), selfie_kept=self._selfies_kept)
        keyboard = _keyboard(job.language, rows)
        announced = self._uploading.pop(job.id, None)
        self._settle(job)
        deadline = monotonic() + DELIVERY_DEADLINE_S
        sent = self._loop.run(
            self._send_result(job, photos, captions, keyboard, spoiler, announced, deadline),
            DELIVERY_DEADLINE_S + SEND_TIME_S,
        )
        went_to = sent[0].chat_id
        return Delivered(
            file_ids=[_largest_photo_id(message) for message in sent],
            message_ids=[message.message_id for message in sent],
            chat_id=went_to if went_to != job.chat_id else None,
            follow_up=partial(
                self._follow_up, job, lambda until: self._after_result(job, sent, keyboard, until)
            ),
        )

    async def _send_result(
        self,
        job: JobView,
        photos: Sequence[bytes],
        captions: Sequence[str],
        keyboard: InlineKeyboardMarkup,
        spoiler: bool,
        announced: Future[None] | None,
        deadline: float,
    ) -> list[Message]:
        # The chat action lands first: arriving after the photo, a client would show "sending
        # a photo" under it for 5 s.
        if announced is None:
            await self._upload_action(job)
        else:
            await asyncio.wrap_future(announced)
        what = f"job {job.id}'s result"
        if len(photos) == 1:
            photo = await self._send(
                job,
                what,
                lambda chat_id, reply: self._bot.send_photo(
                    chat_id,
                    photos[0],
                    caption=captions[0],
                    has_spoiler=spoiler,
                    reply_parameters=reply,
                    reply_markup=keyboard,
                    **_UPLOAD_TIMEOUTS,
                ),
                deadline,
            )
            return [photo]
        album = await self._send(
            job,
            what,
            lambda chat_id, reply: self._bot.send_media_group(
                chat_id,
                [
                    InputMediaPhoto(photo, caption=caption, has_spoiler=spoiler)
                    for photo, caption in zip(photos, captions, strict=True)
                ],
                reply_parameters=reply,
                **_UPLOAD_TIMEOUTS,
            ),
            deadline,
        )
        return list(album)

    def _follow_up(self, job: JobView, steps: Callable[[float], Coroutine[Any, Any, None]]) -> None:
        """Run what follows a sent result within its own time. Neither a failure nor a wait
        past that time is raised: the result is in the chat, so the job was delivered."""
        try:
            self._loop.run(
                steps(monotonic() + FOLLOW_UP_DEADLINE_S), FOLLOW_UP_DEADLINE_S + SEND_TIME_S
            )
        except Exception:
            log.warning(
                "job %s: its result was sent; what follows it was not done in %.0f s",
                job.id,
                FOLLOW_UP_DEADLINE_S,
                exc_info=True,
            )

    async def _after_result(
        self, job: JobView, sent: Sequence[Message], keyboard: InlineKeyboardMarkup, deadline: float
    ) -> None:
        if len(sent) > 1:
            # An album carries no buttons: they come in a message of their own, under it (in
            # the chat it went to).
            key = "button.avatar_album" if job.kind == JobKind.AVATAR else "button.album"
            chat_id, first = sent[0].chat_id, sent[0].message_id
            buttons = self._respecting_limits(
                chat_id,
                lambda: self._bot.send_message(
                    chat_id,
                    text(job.language, key, count=len(sent)),
                    reply_parameters=ReplyParameters(first, allow_sending_without_reply=True),
                    reply_markup=keyboard,
                ),
                deadline,
                f"job {job.id}'s album buttons",
            )
            await self._quietly(job, "the album's buttons", buttons, chat_id)
        await self._remove_status(job, deadline)

    def blocked(self, job: JobView) -> None:
        """Tell the user their images were held back by the content check (credits back)."""
        self._notify(job, text(job.language, "moderation.blocked_result"))

    def _notify(self, job: JobView, notice: str) -> None:
        """Put a final word on the job's status message, or else send it as a reply."""
        self._settle(job)
        deadline = monotonic() + NOTICE_DEADLINE_S
        try:
            self._loop.run(
                self._replace_status(job, notice, deadline), NOTICE_DEADLINE_S + SEND_TIME_S
            )
        except Exception:
            log.exception("could not tell chat %s about job %s", job.chat_id, job.id)

    async def _replace_status(self, job: JobView, notice: str, deadline: float) -> None:
        """The notice on the status message, once the chat's flood limit allows. Sent as a
        reply instead only when the edit is refused (the user deleted the status message) or
        the group became a supergroup."""
        message_id = job.status_message_id
        if message_id is not None and job.chat_id not in self._migrated:
            try:
                await self._respecting_limits(
                    job.chat_id,
                    lambda: self._bot.edit_message_text(
                        notice, chat_id=job.chat_id, message_id=message_id
                    ),
                    deadline,
                    f"job {job.id}'s notice",
                )
                return
            except BadRequest as exc:
                log.warning("job %s: could not edit its status message (%s); replying", job.id, exc)
            except ChatMigrated as exc:
                self._moved(job, job.chat_id, exc.new_chat_id)
        await self._send(
            job,
            f"job {job.id}'s notice",
            lambda chat_id, reply: self._bot.send_message(chat_id, notice, reply_parameters=reply),
            deadline,
        )

    async def _remove_status(self, job: JobView, deadline: float) -> None:
        # A migrated group's status message stays in the old group, which takes no more calls.
        message_id = job.status_message_id
        if message_id is None or job.chat_id in self._migrated:
            return
        removal = self._respecting_limits(
            job.chat_id,
            lambda: self._bot.delete_message(job.chat_id, message_id),
            deadline,
            f"job {job.id}'s status removal",
        )
        await self._quietly(job, "the status message's removal", removal)

    def deliver_previews(self, job: JobView, grid: Path) -> list[str]:
        """Send the style grid with a button per style."""
        self._settle(job)
        photo = grid.read_bytes()
        keyboard = _keyboard(job.language, style_buttons(self._catalogue, job.language))
        caption = text(job.language, "styles.grid_caption")
        sent = self._loop.run(
            self._send(
                job,
                f"job {job.id}'s style grid",
                lambda chat_id, reply: self._bot.send_photo(
                    chat_id,
                    photo,
                    caption=caption,
                    reply_parameters=reply,
                    reply_markup=keyboard,
                    **_UPLOAD_TIMEOUTS,
                ),
                monotonic() + DELIVERY_DEADLINE_S,
            ),
            DELIVERY_DEADLINE_S + SEND_TIME_S,
        )
        self._follow_up(job, lambda until: self._remove_status(job, until))
        return [_largest_photo_id(sent)]

    def apologise(self, job: JobView) -> None:
        """Tell the user their job failed: on the status message, or else as a reply."""
        self._notify(job, text(job.language, "error.generation_failed", job_id=job.id))
