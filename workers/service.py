"""Running one job: the body of the generate task, free of Celery."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from time import perf_counter

from PIL import Image

from chitrakar.domain import MAX_ATTEMPTS, JobKind
from db import jobs
from db.jobs import JobView
from workers.pipelines import (
    ProgressCallback,
    image_to_image,
    text_to_image,
    upscale,
    use_lora,
)
from workers.previews import make_preview_grid
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class InputMissing(RuntimeError):
    """The image a job starts from is no longer on disk."""


def run_job(runtime: WorkerRuntime, job_id: int) -> None:
    """Make a job's images and deliver them; on any failure, record it and apologise.
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
    log.info("job %s (%s) started (attempt %s)", job_id, job.kind, job.attempts)
    try:
        delivery.started(job)
        started = perf_counter()

        def on_progress(done: int, total: int) -> None:
            delivery.progress(job, done, total)

        if job.kind == JobKind.PREVIEWS:
            paths = [_previews(runtime, on_progress)]
            seconds = perf_counter() - started
            file_ids = delivery.deliver_previews(job, paths[0])
        else:
            images = make_images(runtime, job, on_progress)
            seconds = perf_counter() - started
            paths = _save(runtime, job, images)
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


def make_images(
    runtime: WorkerRuntime, job: JobView, on_progress: ProgressCallback
) -> list[Image.Image]:
    """The one place that picks the pipeline call for a kind of job."""
    loaded, plan = runtime.pipeline, job.plan
    use_lora(loaded, plan.lora, plan.lora_scale)
    if job.kind == JobKind.AVATAR:
        return runtime.identity.avatars(loaded, plan, _input(job), on_progress)
    extra = runtime.identity.without_face(loaded)
    if job.kind == JobKind.PORTRAIT:
        return text_to_image(loaded, plan, on_progress, **extra)
    if job.kind == JobKind.VARIATION:
        return image_to_image(loaded, plan, _input(job), on_progress, **extra)
    if job.kind == JobKind.UPSCALE:
        tile = runtime.settings.image_size
        return upscale(loaded, plan, _input(job), tile, on_progress, **extra)
    raise ValueError(f"job {job.id} is of a kind no pipeline makes: {job.kind}")


def _input(job: JobView) -> Image.Image:
    if job.input_path is None or not Path(job.input_path).is_file():
        raise InputMissing(f"the input image of job {job.id} is gone: {job.input_path}")
    with Image.open(job.input_path) as image:
        return image.convert("RGB")


def _save(runtime: WorkerRuntime, job: JobView, images: list[Image.Image]) -> list[Path]:
    folder = runtime.result_dir(job.id)
    paths = []
    for index, (image, seed) in enumerate(zip(images, job.plan.seeds, strict=True)):
        path = folder / f"{index}-{seed}.png"
        image.save(path, format="PNG")
        paths.append(path)
    return paths


def _previews(runtime: WorkerRuntime, on_progress: ProgressCallback) -> Path:
    return make_preview_grid(
        runtime.pipeline,
        runtime.catalogue,
        runtime.media,
        runtime.settings.model_label,
        runtime.settings.image_size,
        on_progress,
        extra=runtime.identity.without_face(runtime.pipeline),
    )


def _give_up(runtime: WorkerRuntime, job_id: int, reason: str) -> None:
    with runtime.store.unit_of_work() as uow:
        failed = jobs.fail_job(uow, job_id, reason)
    if failed is None:
        return
    if failed.kind == JobKind.AVATAR and failed.parent_job_id is None:
        # Only a done avatar's selfie is kept (for Again); a failed one's is of no further use.
        runtime.media.forget_input(failed.input_path)
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
