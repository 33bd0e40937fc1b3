"""Celery tasks: each takes a job id and hands it to the service layer."""

from __future__ import annotations

from functools import cache

from chitrakar.queue import GENERATE_TASK, publish_generate
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
