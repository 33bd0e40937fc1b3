"""Celery tasks: each takes a job id (or nothing) and hands it to the service layer."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache

from celery import Task
from sqlalchemy.exc import OperationalError

from chitrakar.queue import (
    GENERATE_TASK,
    HAND_OVER_TASK,
    RETENTION_TASK,
    publish_generate,
)
from chitrakar.retention import sweep
from chitrakar.services import hand_over_all_held
from workers.celery_app import app, settings
from workers.runtime import WorkerRuntime
from workers.service import run_job

# A task the database failed (after the service's own retries of each record) is sent again
# this many times, after 2, 4, 8, 16 s, ... up to DATABASE_AWAY_MAX_WAIT_S (with jitter).
DATABASE_AWAY_RETRIES = 12
DATABASE_AWAY_MAX_WAIT_S = 60


class JobTask(Task):  # type: ignore[misc]
    """The one base of the worker's tasks: their retries live here, not in each task. Every
    task is idempotent (the database decides whether anything is left to do: a message for
    a job started or ended does nothing), so one that failed because the database was away
    is sent again, later, rather than acknowledged and lost (acks_late acknowledges a failed
    task's message too): the job would otherwise wait for the reconciler's republish,
    CHITRAKAR_REPUBLISH_AFTER after its hand-over. Its copy goes to the back of the queue
    with a countdown, so the worker takes the other messages meanwhile; after the last retry
    the reconciler is left to publish it again."""

    autoretry_for = (OperationalError,)
    max_retries = DATABASE_AWAY_RETRIES
    retry_backoff = 2
    retry_backoff_max = DATABASE_AWAY_MAX_WAIT_S
    retry_jitter = True


@cache
def runtime() -> WorkerRuntime:
    """One runtime per worker process (the solo pool runs tasks in the main process)."""
    return WorkerRuntime(settings, lambda job_id: publish_generate(app, job_id))


@app.task(name=GENERATE_TASK, base=JobTask)
def generate_images_task(job_id: int) -> None:
    run_job(runtime(), job_id)


@app.task(name=RETENTION_TASK, base=JobTask)
def retention_sweep_task() -> None:
    worker = runtime()
    sweep(settings, worker.store, worker.artifacts, worker.media, datetime.now(UTC))


@app.task(name=HAND_OVER_TASK, base=JobTask)
def hand_over_held_task() -> None:
    worker = runtime()
    hand_over_all_held(worker.store, worker.publish, settings.max_jobs_in_flight)
