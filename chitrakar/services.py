"""Taking in a request from any chat channel: record the job, then hand it to the queue.

Blocking (database, broker) calls; channels run them in a thread.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from chitrakar.config import Settings
from chitrakar.domain import ImageRequest, plan_generation, was_abandoned
from db import jobs
from db.jobs import Origin
from db.session import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    job_id: int
    position: int
    # The request had already made this job (its update came twice): it has been answered.
    duplicate: bool = False


class JobIntake:
    def __init__(self, settings: Settings, store: Store, publish: Callable[[int], None]) -> None:
        self._settings = settings
        self._store = store
        self._publish = publish
        self._rng = random.SystemRandom()

    def accept(self, origin: Origin, request: ImageRequest) -> Accepted:
        """Write the job row (the source of truth) before anything is published."""
        plan = plan_generation(
            request,
            base_size=self._settings.image_size,
            default_steps=self._settings.default_steps,
            guidance_scale=self._settings.guidance_scale,
            rng=self._rng,
        )
        with self._store.unit_of_work() as uow:
            try:
                job_id = jobs.create_job(uow, origin, request, plan)
            except jobs.DuplicateRequest as duplicate:
                job = duplicate.job
                # Taken in long ago but never answered (the bot stopped in between): answer
                # and publish it now. Otherwise the first delivery of the update has it.
                age = (datetime.now(UTC) - job.created_at).total_seconds()
                if not was_abandoned(job.status, job.status_message_id is not None, age):
                    log.info(
                        "message %s in chat %s repeated; job %s has it",
                        origin.request_message_id,
                        origin.chat_id,
                        job.id,
                    )
                    return Accepted(job_id=job.id, position=0, duplicate=True)
                job_id = job.id
            position = jobs.queue_position(uow, job_id)
        log.info("job %s accepted from %s chat %s", job_id, origin.channel, origin.chat_id)
        return Accepted(job_id=job_id, position=position)

    def dispatch(self, job_id: int, status_message_id: int | None) -> bool:
        """Publish an accepted job. False when the broker refused it: the job is then
        marked failed, so the caller must tell the user."""
        try:
            if status_message_id is not None:
                with self._store.unit_of_work() as uow:
                    jobs.attach_status_message(uow, job_id, status_message_id)
            self._publish(job_id)
        except Exception as exc:
            log.exception("job %s could not be published", job_id)
            with self._store.unit_of_work() as uow:
                jobs.fail_job(uow, job_id, f"not queued: {type(exc).__name__}: {exc}")
            return False
        return True
