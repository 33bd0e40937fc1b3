"""Running one job: the body of the generate task, free of Celery."""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import perf_counter

from chitrakar.domain import MAX_ATTEMPTS
from db import jobs
from workers.pipelines import generate_images
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def run_job(runtime: WorkerRuntime, job_id: int) -> None:
    """Generate a job's images and deliver them; on any failure, record it and apologise.
    A job that has already ended is left alone, so a redelivered task does no harm."""
    with runtime.store.unit_of_work() as uow:
        job = jobs.start_job(uow, job_id, runtime.name)
    if job is None:
        log.info("job %s has already ended; nothing to do", job_id)
        return
    delivery = runtime.delivery
    if job.attempts > MAX_ATTEMPTS:
        _give_up(runtime, job_id, f"gave up after {MAX_ATTEMPTS} attempts")
        return
    log.info("job %s started (attempt %s)", job_id, job.attempts)
    try:
        delivery.started(job)
        started = perf_counter()
        images = generate_images(
            runtime.pipeline,
            job.plan,
            on_progress=lambda done, total: delivery.progress(job, done, total),
        )
        seconds = perf_counter() - started
        folder = runtime.result_dir(job_id)
        paths = []
        for index, (image, seed) in enumerate(zip(images, job.plan.seeds, strict=True)):
            path = folder / f"{index}-{seed}.png"
            image.save(path, format="PNG")
            paths.append(path)
        file_ids = delivery.deliver(job, paths, seconds)
    except Exception as exc:
        log.exception("job %s failed", job_id)
        _give_up(runtime, job_id, f"{type(exc).__name__}: {exc}")
        return
    with runtime.store.unit_of_work() as uow:
        jobs.complete_job(
            uow,
            job_id,
            result_paths=[str(p) for p in paths],
            result_file_ids=file_ids,
            generation_seconds=seconds,
        )
    log.info("job %s done: %d image(s) in %.2f s", job_id, len(paths), seconds)


def _give_up(runtime: WorkerRuntime, job_id: int, reason: str) -> None:
    with runtime.store.unit_of_work() as uow:
        failed = jobs.fail_job(uow, job_id, reason)
    if failed is not None:
        runtime.delivery.apologise(failed)


def requeue_unfinished(runtime: WorkerRuntime, publish: Callable[[int], None]) -> int:
    """Publish again every job the database says is queued or running. Only for a sole worker
    that has just started (as in `chitrakar run`): then no other process can hold those jobs,
    and a message the embedded broker lost with a stopped worker is replaced. A job that turns
    out to be done already is skipped by `run_job`."""
    with runtime.store.unit_of_work() as uow:
        job_ids = jobs.active_job_ids(uow)
    for job_id in job_ids:
        publish(job_id)
    if job_ids:
        log.warning("re-queued %d unfinished job(s): %s", len(job_ids), job_ids)
    return len(job_ids)
