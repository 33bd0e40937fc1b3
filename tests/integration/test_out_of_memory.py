"""A GPU that runs out of memory: the job is tried once more one image at a time (each keeps
its seed; the VAE decodes in slices and tiles for that retry only), and when even that does
not fit, it fails with a clear reason, an apology (and the credits back). The real worker
service and tiny model; the pipeline call raises torch's own out-of-memory error, as CUDA
would, since a CPU cannot run out of GPU memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from chitrakar.domain import GenerationPlan, JobKind
from chitrakar.texts import text
from db import jobs
from db.jobs import Origin
from db.migrate import upgrade_to_head
from tests.support.botapi import BotApiEmulator
from tests.support.stack import jobs_in_chat, worker_settings
from workers.runtime import WorkerRuntime
from workers.service import run_job

PLAN = GenerationPlan("a lighthouse", 64, 64, 2, (11, 12), 7.0)


@pytest.fixture
def runtime(emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path) -> Iterator[WorkerRuntime]:
    settings = worker_settings(
        emulator,
        tmp_path,
        tiny_model,
    )
    upgrade_to_head(settings.resolved_database_url)
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    yield runtime
    runtime.close()


def a_job(runtime: WorkerRuntime, emulator: BotApiEmulator, user_id: int) -> tuple[int, int]:
    user = emulator.user(user_id, "Anil")
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/portrait a lighthouse --n 2")
    origin = Origin(
        "telegram", chat["id"], "private", str(user_id), "Anil", "en", command["message_id"]
    )
    with runtime.store.unit_of_work() as uow:
        return jobs.take_in(uow, origin, JobKind.PORTRAIT, PLAN).job_id, chat["id"]


def limit_batch(
    runtime: WorkerRuntime, fits: int, vae: list[tuple[bool, bool]] | None = None
) -> list[int]:
    """Make the pipeline run out of memory for batches over `fits`; returns the batch sizes
    it was asked for (and adds to `vae` whether the VAE sliced and tiled for each)."""
    pipeline = runtime.pipeline.text2image
    real = type(pipeline).__call__
    asked: list[int] = []

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        batch = kwargs.get("num_images_per_prompt", 1)
        asked.append(batch)
        if vae is not None:
            vae.append((self.vae.use_slicing, self.vae.use_tiling))
        if batch > fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    pipeline.__class__ = type("LimitedMemory", (type(pipeline),), {"__call__": call})
    return asked


def test_a_batch_too_big_for_the_gpu_is_made_one_image_at_a_time(
    runtime: WorkerRuntime, emulator: BotApiEmulator
) -> None:
    job_id, chat = a_job(runtime, emulator, 811)
    vae: list[tuple[bool, bool]] = []
    asked = limit_batch(runtime, fits=1, vae=vae)
    run_job(runtime, job_id)

    assert asked == [2, 1, 1]
    # The retry decodes in slices and tiles; the jobs after it decode whole again (tiles
    # change a large image's pixels).
    assert vae == [(False, False), (True, True), (True, True)]
    after = runtime.pipeline.text2image.vae
    assert (after.use_slicing, after.use_tiling) == (False, False)
    [job] = jobs_in_chat(runtime.settings.resolved_database_url, chat)
    assert job.status == "done" and job.attempts == 1
    assert [path.rsplit("/", 1)[1] for path in job.result_paths or []] == ["0-11.png", "1-12.png"]
    assert len(emulator.calls_to("sendMediaGroup", chat)) == 1


def test_a_job_that_fits_not_even_alone_fails_clearly_with_an_apology(
    runtime: WorkerRuntime, emulator: BotApiEmulator
) -> None:
    job_id, chat = a_job(runtime, emulator, 812)
    limit_batch(runtime, fits=0)
    run_job(runtime, job_id)

    [job] = jobs_in_chat(runtime.settings.resolved_database_url, chat)
    assert job.status == "failed"
    assert job.error is not None and job.error.startswith("GpuOutOfMemory: out of GPU memory")
    [apology] = emulator.calls_to("sendMessage", chat)
    assert apology.params["text"] == text("en", "error.generation_failed", job_id=job_id)
    assert emulator.calls_to("sendMediaGroup", chat) == []
