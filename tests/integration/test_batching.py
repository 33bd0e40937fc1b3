"""Dynamic batching in the worker: queued portrait jobs that can share a pipeline call are
drawn in one, each image the same as it would be alone; the rest run as before. The real
worker service, tiny model, store (SQLite and PostgreSQL) and Bot API emulator."""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from chitrakar.domain import GenerationPlan, JobKind, JobStatus, batch_key
from db import jobs, privacy
from db.migrate import upgrade_to_head
from db.models import utcnow
from tests.support.botapi import BotApiEmulator
from tests.support.stack import worker_settings
from tests.support.worker import QueuedJobs
from workers import service
from workers.pipelines import text_to_image
from workers.runtime import WorkerRuntime
from workers.service import run_job


def _plan(prompt: str, seed: int, size: int = 64, images: int = 1) -> GenerationPlan:
    return GenerationPlan(prompt, size, size, 3, tuple(seed + i for i in range(images)), 7.0)


class Deployment(QueuedJobs):
    def events(self, job_id: int) -> list[str]:
        from sqlalchemy import select

        from db.models import JobEvent

        with self.runtime.store.unit_of_work() as uow:
            return [
                f"{e.status}: {e.detail}"
                for e in uow.session.scalars(
                    select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
                )
            ]

    def images(self, job_id: int) -> list[np.ndarray[Any, Any]]:
        view = self.view(job_id)
        arrays = []
        for key in view.result_paths:
            with Image.open(io.BytesIO(self.runtime.artifacts.get(key))) as image:
                arrays.append(np.asarray(image.convert("RGB"), dtype=np.int16))
        return arrays


@pytest.fixture
def deployment(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, database_url: str
) -> Any:
    settings = worker_settings(
        emulator,
        tmp_path,
        tiny_model,
        database_url=database_url,
        max_batch_images=8,
        batch_window_ms=0,
    )
    upgrade_to_head(settings.resolved_database_url)
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    try:
        yield Deployment(emulator, runtime)
    finally:
        runtime.close()


def test_compatible_queued_jobs_are_drawn_in_one_call_each_image_as_if_alone(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    pipe = deployment.runtime.pipeline.text2image
    original = pipe.__call__

    first = deployment.job(901, _plan("a lighthouse at dusk", 11))
    second = deployment.job(902, _plan("a banyan tree", 22, images=1))
    third = deployment.job(903, _plan("a tea stall in the rain", 33))
    other_size = deployment.job(904, _plan("a kite", 44, size=128))
    held = deployment.job(905, _plan("a fishing boat", 55), handed_over=False)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(kwargs["generator"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", lambda _self, *a, **k: counting(*a, **k))
    run_job(deployment.runtime, first)
    monkeypatch.undo()
    # One pipeline call drew the three compatible jobs' images; the others were left alone.
    assert calls == [3]
    for job_id in (first, second, third):
        view = deployment.view(job_id)
        assert view.status == "done" and view.attempts == 1 and view.delivered
        assert len(deployment.emulator.calls_to("sendPhoto", deployment.chats[job_id])) == 1
    assert any(f"batched with job {first}" in e for e in deployment.events(second))
    assert deployment.view(other_size).status == "queued"
    assert deployment.view(held).status == "queued"

    # The companions' own messages arrive later and find nothing to do.
    run_job(deployment.runtime, second)
    assert deployment.view(second).attempts == 1
    assert len(deployment.emulator.calls_to("sendPhoto", deployment.chats[second])) == 1

    # Each image equals the one its job would have made alone (same seed, same noise).
    loaded = deployment.runtime.pipeline
    for job_id in (first, second, third):
        [alone] = text_to_image(loaded, deployment.view(job_id).plan)
        [batched] = deployment.images(job_id)
        difference = np.abs(np.asarray(alone, dtype=np.int16) - batched)
        assert difference.max() <= 2, f"job {job_id} differs by {difference.max()}"


def test_a_batch_stays_within_the_image_limit(deployment: Deployment) -> None:
    deployment.runtime.settings.max_batch_images = 4
    ids = [deployment.job(910 + i, _plan(f"a temple {i}", i, images=2)) for i in range(3)]
    run_job(deployment.runtime, ids[0])
    statuses = [deployment.view(job_id).status for job_id in ids]
    # 2 + 2 images fill the limit: the third job waits for its own turn.
    assert statuses == ["done", "done", "queued"]


def test_without_batching_a_job_runs_alone(deployment: Deployment) -> None:
    deployment.runtime.settings.max_batch_images = 1
    first = deployment.job(920, _plan("a river", 1))
    second = deployment.job(921, _plan("a hill", 2))
    run_job(deployment.runtime, first)
    assert deployment.view(first).status == "done"
    assert deployment.view(second).status == "queued"


def test_a_cancelled_job_leaves_its_batch_and_the_rest_are_delivered(
    deployment: Deployment,
) -> None:
    leader_id = deployment.job(930, _plan("a peacock", 5))
    companion_id = deployment.job(931, _plan("a camel", 6))
    runtime = deployment.runtime
    with runtime.store.unit_of_work() as uow:
        leader = jobs.start_job(uow, leader_id, runtime.name)
    assert leader is not None
    with runtime.store.unit_of_work() as uow:
        [companion] = jobs.claim_batch(uow, leader, runtime.name, 8)
    with runtime.store.unit_of_work() as uow:
        jobs.cancel_jobs(uow, "telegram", None, "931")
    batch = [leader, companion]
    service._finish_batch(runtime, batch, service._run_batch(runtime, batch))
    assert deployment.view(leader_id).status == "done"
    assert deployment.view(companion_id).status == "cancelled"
    assert deployment.emulator.calls_to("sendPhoto", deployment.chats[companion_id]) == []


def test_the_window_is_waited_only_when_other_jobs_queue(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(service.time, "sleep", waits.append)
    deployment.runtime.settings.batch_window_ms = 40
    lone = deployment.job(940, _plan("a lone lotus", 7))
    run_job(deployment.runtime, lone)
    assert waits == []  # a lone user's job does not wait
    busy = deployment.job(941, _plan("a market", 8))
    deployment.job(942, _plan("a kite", 9, size=128))  # queued, of another shape
    run_job(deployment.runtime, busy)
    assert waits == [0.04]


def test_batch_key_separates_what_one_call_cannot_share() -> None:
    base = _plan("x", 1)
    assert batch_key(JobKind.PORTRAIT, base) == batch_key(JobKind.PORTRAIT, _plan("y", 99))
    for other in (
        _plan("x", 1, size=128),
        _plan("x", 1, images=2),
        GenerationPlan("x", 64, 64, 4, (1,), 7.0),
        GenerationPlan("x", 64, 64, 3, (1,), 5.0),
        GenerationPlan("x", 64, 64, 3, (1,), 7.0, negative_prompt="blur"),
        GenerationPlan("x", 64, 64, 3, (1,), 7.0, lora="/styles/ink.safetensors"),
    ):
        assert batch_key(JobKind.PORTRAIT, other) != batch_key(JobKind.PORTRAIT, base)
    for kind in (JobKind.AVATAR, JobKind.VARIATION, JobKind.UPSCALE, JobKind.PREVIEWS):
        assert batch_key(kind, base) is None


def _claim(deployment: Deployment, leader_id: int) -> tuple[jobs.JobView, list[jobs.JobView]]:
    runtime = deployment.runtime
    with runtime.store.unit_of_work() as uow:
        leader = jobs.start_job(uow, leader_id, runtime.name)
    assert leader is not None
    with runtime.store.unit_of_work() as uow:
        return leader, jobs.claim_batch(uow, leader, runtime.name, 8)


def test_only_first_attempts_never_delivered_are_taken_along(deployment: Deployment) -> None:
    runtime = deployment.runtime
    leader_id = deployment.job(950, _plan("a boat", 1))
    delivered_id = deployment.job(951, _plan("a bridge", 2))
    retried_id = deployment.job(952, _plan("a well", 3))
    fresh_id = deployment.job(953, _plan("a fort", 4))
    # One was sent before its worker died and was handed back; one has killed a worker.
    for job_id in (delivered_id, retried_id):
        with runtime.store.unit_of_work() as uow:
            assert jobs.start_job(uow, job_id, "dead-worker") is not None
    with runtime.store.unit_of_work() as uow:
        jobs.mark_delivered(uow, delivered_id, deployment.chats[delivered_id], ["f"], [1])
    with runtime.store.unit_of_work() as uow:
        assert set(jobs.hand_back_from_dead_workers(uow, alive=set())) >= {
            delivered_id,
            retried_id,
        }

    _leader, companions = _claim(deployment, leader_id)
    assert [job.id for job in companions] == [fresh_id]


def test_a_job_failing_in_a_batch_fails_alone(deployment: Deployment) -> None:
    blocked_id = deployment.job(960, _plan("a parrot", 1))
    fine_id = deployment.job(961, _plan("a mango", 2))
    forgotten_id = deployment.job(962, _plan("a drum", 3))
    emulator = deployment.emulator
    # The leader's result is refused: its user blocked the bot. Another user had everything
    # about them deleted (/forget) once their job was in the batch.
    emulator.fail(
        "sendPhoto",
        403,
        "Forbidden: bot was blocked by the user",
        chat_id=deployment.chats[blocked_id],
    )
    leader, companions = _claim(deployment, blocked_id)
    assert len(companions) == 2
    with deployment.runtime.store.unit_of_work() as uow:
        assert privacy.delete(uow.session, "telegram", "962", date.today()) is not None
        uow.commit()

    batch = [leader, *companions]
    service._finish_batch(deployment.runtime, batch, service._run_batch(deployment.runtime, batch))
    assert deployment.view(blocked_id).status == "failed"
    assert deployment.view(fine_id).status == "done"
    assert len(emulator.calls_to("sendPhoto", deployment.chats[fine_id])) == 1
    with deployment.runtime.store.unit_of_work() as uow:
        assert jobs.get_job(uow, forgotten_id) is None
    assert emulator.calls_to("sendPhoto", deployment.chats[forgotten_id]) == []


def test_a_batch_too_big_for_the_gpu_is_made_job_by_job(deployment: Deployment) -> None:
    pipe = deployment.runtime.pipeline.text2image
    real = type(pipe).__call__
    asked: list[int] = []

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(len(kwargs["generator"]))
        if len(kwargs["generator"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    pipe.__class__ = type("LimitedMemory", (type(pipe),), {"__call__": call})
    ids = [deployment.job(970 + i, _plan(f"a lamp {i}", i)) for i in range(3)]
    run_job(deployment.runtime, ids[0])
    assert asked == [3, 1, 1, 1]
    assert [deployment.view(job_id).status for job_id in ids] == ["done"] * 3


def test_under_a_few_step_preset_the_caption_tells_the_steps_that_ran(
    deployment: Deployment,
) -> None:
    deployment.runtime.settings.preset = "lcm"  # 4 steps, whatever the job asked for
    job_id = deployment.job(940, _plan("a lotus pond", 9))
    assert deployment.view(job_id).plan.steps == 3
    run_job(deployment.runtime, job_id)
    [photo] = deployment.emulator.calls_to("sendPhoto", deployment.chats[job_id])
    assert "· 4 steps ·" in photo.params["caption"]
    # What the job asked for stays on its record: Again asks for the same.
    assert deployment.view(job_id).plan.steps == 3


def test_claims_a_batch_lost_track_of_go_back_to_the_queue(deployment: Deployment) -> None:
    """Only the jobs this worker started while the leader claimed, unmade and not in the
    batch, are handed back: not the batch's own, not an earlier or a later batch's, not
    another worker's."""
    runtime = deployment.runtime
    earlier, leader_id, elsewhere, kept, unseen, later = (
        deployment.job(960 + n, _plan(f"a kite {n}", n)) for n in range(6)
    )

    def start(job_id: int, worker: str = runtime.name) -> jobs.JobView:
        with runtime.store.unit_of_work() as uow:
            started = jobs.start_job(uow, job_id, worker)
        assert started is not None
        return started

    start(earlier)
    leader = start(leader_id)
    start(elsewhere, "other-worker")
    start(kept)
    start(unseen)
    claims_ended = utcnow()
    start(later)
    assert leader.started_at is not None
    with runtime.store.unit_of_work() as uow:
        handed = jobs.hand_back_unseen_claims(
            uow, runtime.name, leader.started_at, claims_ended, [leader_id, kept]
        )
    assert handed == [unseen]
    with runtime.store.unit_of_work() as uow:
        states = {job_id: jobs.get_job(uow, job_id).status for job_id in deployment.chats}
    assert states[unseen] == JobStatus.QUEUED
    assert {states[job_id] for job_id in (earlier, leader_id, elsewhere, kept, later)} == {
        JobStatus.RUNNING
    }
