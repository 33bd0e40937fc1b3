"""Running one job: the body of the generate task, free of Celery."""

from __future__ import annotations

import logging
from time import perf_counter

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
    log.info("job %s started (attempt %s)", job_id, job.attempts)
    delivery = runtime.delivery
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
        with runtime.store.unit_of_work() as uow:
            failed = jobs.fail_job(uow, job_id, f"{type(exc).__name__}: {exc}")
        if failed is not None:
            delivery.apologise(failed)
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
