"""Retention on real databases: the sweep removes what is due and nothing else, and with no
input retention a selfie crop goes as soon as its avatar job ends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from PIL import Image

from chitrakar.artifacts import LocalArtifactStore
from chitrakar.config import Settings
from chitrakar.domain import Command, GenerationPlan, JobKind, parse_image_command
from chitrakar.media import MediaStore
from chitrakar.retention import SweepReport, sweep
from chitrakar.services import JobIntake
from db import jobs
from db.jobs import Origin
from db.migrate import upgrade_to_head
from db.models import Job
from db.session import Store
from tests.support.botapi import BotApiEmulator
from tests.support.stack import jobs_in_chat, worker_settings
from workers.classifier import ImageVerdict
from workers.runtime import WorkerRuntime
from workers.service import run_job

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PLAN = GenerationPlan("p", 64, 64, 4, (1,), 7.0, strength=0.5)


def finished_job(
    store: Store,
    artifacts: LocalArtifactStore,
    message_id: int,
    ended: datetime | None,
    kind: JobKind = JobKind.PORTRAIT,
    input_path: str | None = None,
) -> int:
    who = Origin("telegram", 42, "private", "42", "Asha", "en", message_id)
    with store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, who, kind, PLAN, input_path=input_path).job_id
        if ended is None:  # still running
            jobs.start_job(uow, job_id, "w")
            return job_id
        jobs.start_job(uow, job_id, "w")
        stored = artifacts.put(f"results/{job_id}/0-1.png", b"png of job %d" % job_id)
        jobs.complete_job(
            uow,
            job_id,
            result_paths=[stored.key],
            result_checksums=[stored.sha256],
            result_file_ids=["file"],
            generation_seconds=1.0,
        )
        job = uow.session.get(Job, job_id)
        assert job is not None
        job.finished_at = ended
        uow.commit()
    return job_id


def test_the_sweep_removes_what_is_due_and_nothing_else(store: Store, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, retention_days=30, input_retention_hours=24)
    artifacts, media = LocalArtifactStore(tmp_path / "artifacts"), MediaStore(tmp_path / "media")
    old = finished_job(store, artifacts, 1, NOW - timedelta(days=31))
    recent = finished_job(store, artifacts, 2, NOW - timedelta(days=29))
    old_selfie = media.save_input(Image.new("RGB", (64, 64)))
    finished_job(store, artifacts, 3, NOW - timedelta(hours=25), JobKind.AVATAR, old_selfie)
    # A selfie used again (🔄 Again) by a job still running is kept, however old the first.
    busy_selfie = media.save_input(Image.new("RGB", (64, 64)))
    finished_job(store, artifacts, 4, NOW - timedelta(hours=30), JobKind.AVATAR, busy_selfie)
    finished_job(store, artifacts, 5, None, JobKind.AVATAR, busy_selfie)
    fresh_selfie = media.save_input(Image.new("RGB", (64, 64)))
    finished_job(store, artifacts, 6, NOW - timedelta(hours=1), JobKind.AVATAR, fresh_selfie)
    artifacts.put("results/999999/0-1.png", b"left by a failed deletion")

    report = sweep(settings, store, artifacts, media, NOW)

    assert report == SweepReport(results=1, inputs=1, orphans=1)
    assert not artifacts.keys(f"results/{old}/") and artifacts.keys(f"results/{recent}/")
    assert not artifacts.keys("results/999999/")
    assert not Path(old_selfie).exists()
    assert Path(busy_selfie).exists() and Path(fresh_selfie).exists()
    with store.unit_of_work() as uow:
        gone = uow.session.get(Job, old)
        assert gone is not None
        assert (gone.result_paths, gone.result_file_ids, gone.status) == (None, None, "done")
        assert gone.events[-1].detail == "results deleted (retention)"
        kept = uow.session.get(Job, recent)
        assert kept is not None and kept.result_paths == [f"results/{recent}/0-1.png"]
    # Nothing more is due: a second sweep changes nothing.
    assert sweep(settings, store, artifacts, media, NOW) == SweepReport()
    store.dispose()


def _avatar(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, user_id: int
) -> tuple[WorkerRuntime, int, int, str]:
    """A worker with no input retention (the default) and an avatar job taken in for it:
    the runtime, the job, its chat and its selfie crop."""
    settings = worker_settings(emulator, tmp_path, tiny_model, image_size=64, default_steps=2)
    assert settings.input_retention_hours == 0  # the default
    upgrade_to_head(settings.resolved_database_url)
    user = emulator.user(user_id, "Tara")
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/avatar anime --n 2")
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    intake = JobIntake(
        settings, runtime.store, lambda _: None, runtime.catalogue, runtime.media, runtime.artifacts
    )
    who = Origin(
        "telegram", chat["id"], "private", str(user_id), "Tara", "en", command["message_id"]
    )
    request = parse_image_command(Command.AVATAR, "anime --n 2")
    accepted = intake.accept(who, request, Image.new("RGB", (64, 64), "tan"))
    [job] = jobs_in_chat(settings.resolved_database_url, chat["id"])
    assert job.input_path is not None and Path(job.input_path).exists()
    return runtime, accepted.job_id, chat["id"], job.input_path


def test_with_no_input_retention_the_selfie_goes_with_its_job(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    runtime, job_id, chat_id, selfie = _avatar(emulator, tmp_path, tiny_model, 821)
    try:
        run_job(runtime, job_id)
    finally:
        runtime.close()

    [job] = jobs_in_chat(runtime.settings.resolved_database_url, chat_id)
    assert job.status == "done" and job.input_path is None
    assert not Path(selfie).exists()
    [buttons] = emulator.calls_to("sendMessage", chat_id)
    data = [
        b["callback_data"] for row in buttons.params["reply_markup"]["inline_keyboard"] for b in row
    ]
    assert f"a:{job.id}" not in data  # no 🔄 Again: the selfie is gone
    assert f"p:{job.id}:0" in data


class HandedBackWhileChecked:
    """A content check during which the reconciler takes the worker for dead (a long pause)
    and hands its job back to the queue."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    def classify_all(self, images: list[Image.Image]) -> list[ImageVerdict]:
        with self.runtime.store.unit_of_work() as uow:
            assert jobs.hand_back_from_dead_workers(uow, set())  # no heartbeat: "dead"
        return [ImageVerdict(flagged=False, labels=(), score=0.0) for _ in images]


def test_a_selfie_stays_for_the_next_attempt_of_a_job_handed_back(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    runtime, job_id, chat_id, selfie = _avatar(emulator, tmp_path, tiny_model, 822)
    runtime.__dict__["classifier"] = HandedBackWhileChecked(runtime)
    try:
        run_job(runtime, job_id)  # stops quietly: the job is another worker's now
    finally:
        runtime.close()
    [job] = jobs_in_chat(runtime.settings.resolved_database_url, chat_id)
    assert job.status == "queued" and job.input_path == selfie
    assert Path(selfie).exists()  # the next attempt makes the avatars from it
    assert emulator.calls_to("sendPhoto", chat_id) == []
