"""Sending results to the built-in web chat: the worker writes the chat's messages into the
database (the source of truth) and the web server's change feed shows them on open pages.
Nothing here talks to a browser, so a worker on another host needs only the database."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from time import monotonic

from PIL import Image

from chitrakar.buttons import result_buttons, stored_rows, style_buttons
from chitrakar.config import Settings
from chitrakar.domain import JobKind, ProgressThrottle
from chitrakar.styles import StyleCatalogue
from chitrakar.texts import text
from db import web
from db.jobs import JobView
from db.session import Store
from workers.outbound import Delivered, result_caption

log = logging.getLogger(__name__)

# A page is not rate limited as Telegram is: progress may show more often.
WEB_PROGRESS_INTERVAL_S = 0.5


class WebDelivery:
    def __init__(self, settings: Settings, store: Store, catalogue: StyleCatalogue) -> None:
        self._store = store
        self._catalogue = catalogue
        self._interval = min(settings.progress_interval, WEB_PROGRESS_INTERVAL_S)
        self._selfies_kept = settings.input_retention_hours > 0
        self._throttles: dict[int, ProgressThrottle] = {}

    def _edit_status(self, job: JobView, key: str, **params: object) -> None:
        if job.status_message_id is None:
            return
        throttle = self._throttles.setdefault(job.id, ProgressThrottle(self._interval))
        if not throttle.allow(monotonic()):
            return
        try:
            with self._store.unit_of_work() as uow:
                web.edit(
                    uow,
                    job.chat_id,
                    job.status_message_id,
                    text=text(job.language, key, **params),
                    while_running=job.id,
                )
        except Exception:
            # Progress is a courtesy: a failed edit must not fail the job.
            log.warning("could not show the progress of job %s", job.id, exc_info=True)

    def started(self, job: JobView) -> None:
        self._edit_status(job, "status.running")

    def progress(self, job: JobView, done: int, total: int) -> None:
        self._edit_status(job, "status.progress", percent=round(100 * done / max(total, 1)))

    def stop_progress(self, job: JobView) -> None:
        self._throttles.pop(job.id, None)

    def uploading(self, job: JobView) -> None:
        """A page shows the result as soon as its message arrives: nothing to announce."""

    def deliver(
        self, job: JobView, images: Sequence[Image.Image], seconds: float, spoiler: bool = False
    ) -> Delivered:
        """The images are already in the artifact store; the message refers to them."""
        self.stop_progress(job)
        shown = [
            {
                "job": job.id,
                "index": index,
                "caption": result_caption(self._catalogue, job, seed, seconds),
            }
            for index, seed in enumerate(job.plan.seeds[: len(images)])
        ]
        rows = result_buttons(job.id, job.kind, len(images), selfie_kept=self._selfies_kept)
        with self._store.unit_of_work() as uow:
            message_id = web.post(
                uow,
                job.chat_id,
                from_bot=True,
                text="" if len(images) == 1 else self._album_text(job, len(images)),
                images=shown,
                spoiler=spoiler,
                buttons=stored_rows(job.language, rows),
                reply_to=job.request_message_id,
            )
        return Delivered(
            file_ids=[f"{job.id}/{index}" for index in range(len(images))],
            message_ids=[message_id],
            # Once the delivery is recorded: a failure to remove the status message must not
            # turn a result already in the chat into a failed, refunded job.
            follow_up=lambda: self._remove_status(job),
        )

    @staticmethod
    def _album_text(job: JobView, count: int) -> str:
        key = "button.avatar_album" if job.kind == JobKind.AVATAR else "button.album"
        return text(job.language, key, count=count)

    def _remove_status(self, job: JobView) -> None:
        """Best effort: the result is in the chat whether or not its status message goes."""
        if job.status_message_id is None:
            return
        try:
            with self._store.unit_of_work() as uow:
                web.edit(uow, job.chat_id, job.status_message_id, deleted=True)
        except Exception:
            log.exception("web chat %s: job %s's status message left behind", job.chat_id, job.id)

    def deliver_previews(self, job: JobView, grid: Path) -> list[str]:
        self.stop_progress(job)
        rows = style_buttons(self._catalogue, job.language)
        with self._store.unit_of_work() as uow:
            web.post(
                uow,
                job.chat_id,
                from_bot=True,
                text=text(job.language, "styles.grid_caption"),
                images=[{"grid": grid.name}],
                buttons=stored_rows(job.language, rows),
                reply_to=job.request_message_id,
            )
        self._remove_status(job)
        return []

    def _notify(self, job: JobView, notice: str) -> None:
        """Put a final word on the job's status message, or else post it as a reply."""
        self.stop_progress(job)
        try:
            with self._store.unit_of_work() as uow:
                edited = job.status_message_id is not None and web.edit(
                    uow, job.chat_id, job.status_message_id, text=notice
                )
                if not edited:
                    web.post(
                        uow,
                        job.chat_id,
                        from_bot=True,
                        text=notice,
                        reply_to=job.request_message_id,
                    )
        except Exception:
            log.exception("could not tell web chat %s about job %s", job.chat_id, job.id)

    def blocked(self, job: JobView) -> None:
        self._notify(job, text(job.language, "moderation.blocked_result"))

    def apologise(self, job: JobView) -> None:
        self._notify(job, text(job.language, "error.generation_failed", job_id=job.id))

    def close(self) -> None:
        self._throttles.clear()
