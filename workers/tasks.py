"""Celery tasks: each takes a job id and hands it to the service layer."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache

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


@cache
def runtime() -> WorkerRuntime:
    """One runtime per worker process (the solo pool runs tasks in the main process)."""
    return WorkerRuntime(settings, lambda job_id: publish_generate(app, job_id))


@app.task(name=GENERATE_TASK)
def generate_images_task(job_id: int) -> None:
    run_job(runtime(), job_id)


@app.task(name=RETENTION_TASK)
def retention_sweep_task() -> None:
    worker = runtime()
    sweep(settings, worker.store, worker.artifacts, worker.media, datetime.now(UTC))


@app.task(name=HAND_OVER_TASK)
def hand_over_held_task() -> None:
    worker = runtime()
    hand_over_all_held(worker.store, worker.publish, settings.max_jobs_in_flight)
