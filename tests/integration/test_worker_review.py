"""Worker faults found by a review: a worker restarted under its predecessor's hostname and
pid, a job cancelled while its images are checked, a database away when a message is taken
or when a job ends, and a failure's record whose commit answer is lost. The real worker
service, tiny model, stores and Bot API emulator; the database's faults are its record
functions failing as a lost connection makes them fail."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy.exc import OperationalError

from chitrakar.config import Settings
from chitrakar.domain import Command, GenerationPlan, JobKind, JobStatus, parse_image_command
from chitrakar.services import reconcile
from chitrakar.texts import text
from db import jobs
from db.jobs import Origin
from db.migrate import upgrade_to_head
from db.session import Store
from tests.integration.test_content_check import (
    Flags,
    assert_channel_keeps_nothing,
    intake_for,
    portrait_in,
    worker_for,
)
from tests.integration.test_reconcile import beat, new_job, start, status_of
from tests.support.botapi import BotApiEmulator
from tests.support.stack import jobs_in_chat, worker_settings
from workers import service, tasks
from workers.classifier import ImageVerdict
from workers.runtime import WorkerRuntime
from workers.service import run_job

NOT_FLAGGED = ImageVerdict(flagged=False, labels=(), score=0.0)
WAIT_S = 10.0


def _lost(what: str) -> OperationalError:
    return OperationalError(what, {}, Exception("server closed the connection unexpectedly"))


def _away_while(down: Callable[[], bool], real: Any) -> Any:
    """`real`, refused as by a database that is away while `down()` says so."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if down():
            raise _lost(real.__name__)
        return real(*args, **kwargs)

    return call


def _written_but_answer_lost(real: Any) -> Any:
    """`real`, whose first call is committed but whose answer is lost."""
    calls: list[object] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        result = real(*args, **kwargs)
        if len(calls) == 1:
            raise _lost("COMMIT")
        return result

    return call


def _portrait(emulator: BotApiEmulator, runtime: WorkerRuntime, user_id: int) -> tuple[int, int]:
    """A `/portrait` in the user's private chat, taken in and handed over as the bot does,
    with its status message; the job's id and its chat."""
    user = emulator.user(user_id, "Mohan")
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/portrait a beach")
    status = emulator.history_message(chat, None, "Queued.")
    who = Origin(
        "telegram", chat["id"], "private", str(user_id), "Mohan", "en", command["message_id"]
    )
    intake = intake_for(runtime)
    accepted = intake.accept(who, parse_image_command(Command.PORTRAIT, "a beach"))
    intake.attach_status_message(accepted.job_id, status["message_id"])
    intake.dispatch(accepted)
    return accepted.job_id, chat["id"]


@pytest.fixture
def runtime(emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path) -> Iterator[WorkerRuntime]:
    runtime = worker_for(emulator, tmp_path, tiny_model, Flags(flagged=False))
    try:
        yield runtime
    finally:
        runtime.close()


# 1. A worker restarted with the same hostname and pid (a container's restart).


def test_a_worker_restarted_with_its_predecessors_hostname_and_pid_gets_its_jobs_back(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    """Two processes with one hostname and pid (a container restarted after the OOM killer):
    the new one beats under a name of its own, so the dead one's running job is handed back
    and its redelivered message may start it."""
    settings = Settings(database_url=database_url, data_dir=tmp_path)
    dead = WorkerRuntime(settings, publish=lambda _job_id: None)
    restarted = WorkerRuntime(settings, publish=lambda _job_id: None)
    try:
        assert dead.name != restarted.name
        job_id = new_job(store, 1)
        beat(store, dead.name)
        assert start(store, job_id, dead.name) is not None
        with store.unit_of_work() as uow:
            jobs.record_results(uow, job_id, dead.name, ["results/1/0-1.png"], ["00"])
        beat(store, dead.name, ago_s=120)  # killed two minutes ago
        beat(store, restarted.name)  # its successor beats at once
        published: list[int] = []
        reconcile(store, published.append, Settings(worker_stale_after=60))
        assert published == [job_id]
        assert status_of(store, job_id) == (JobStatus.QUEUED, 1)
        restarted_job = start(store, job_id, restarted.name)
        assert restarted_job is not None and restarted_job.attempts == 2
    finally:
        dead.close()
        restarted.close()


# 2. A job cancelled while its images are checked.


class CancelledWhileCheckedClean:
    """Passes every image; its user cancels the job while the check runs."""

    def __init__(self, runtime: WorkerRuntime, chat_id: int) -> None:
        self.runtime, self.chat_id = runtime, chat_id

    def classify_all(self, images: list[Image.Image]) -> list[ImageVerdict]:
        with self.runtime.store.unit_of_work() as uow:
            assert jobs.cancel_jobs(uow, "telegram", self.chat_id, "831")
        return [NOT_FLAGGED for _ in images]


def test_a_job_cancelled_while_its_clean_images_are_checked_is_not_sent(
    emulator: BotApiEmulator, runtime: WorkerRuntime
) -> None:
    """The user saw "Cancelled." and has their credits back: the images, though clean, are
    not sent, nothing covers the bot's notice, and the channel keeps nothing of the job."""
    group = emulator.group_chat(-1901)
    runtime.__dict__["classifier"] = CancelledWhileCheckedClean(runtime, group["id"])
    portrait_in(emulator, runtime, group)
    assert_channel_keeps_nothing(runtime)
    [job] = jobs_in_chat(runtime.settings.resolved_database_url, group["id"])
    assert job.status == JobStatus.CANCELLED
    assert emulator.calls_to("sendPhoto", group["id"]) == []
    # Progress, and perhaps "Cancelled." put back over a late one: no result, no notice.
    running, cancelled = text("en", "status.running"), text("en", "cancel.status")
    edits = [edit.params["text"] for edit in emulator.calls_to("editMessageText", group["id"])]
    assert all(shown.startswith(running) or shown == cancelled for shown in edits), edits


def test_a_job_whose_images_are_on_their_way_is_not_cancelled_and_ends_done(
    emulator: BotApiEmulator, runtime: WorkerRuntime
) -> None:
    """Too late to stop: the images arrive, so a cancel leaves the job alone (cancelled, it
    was refunded and its images were free); it ends done."""
    group = emulator.group_chat(-1902)
    emulator.delay("sendPhoto", 1.0)
    url = runtime.settings.resolved_database_url
    cancels: list[list[int]] = []

    def cancel_once_results_are_named() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = jobs_in_chat(url, group["id"])
            if found and found[0].result_paths:
                with runtime.store.unit_of_work() as uow:
                    cancelled = jobs.cancel_jobs(uow, "telegram", group["id"], "831")
                cancels.append([one.id for one in cancelled])
                return
            time.sleep(0.02)

    canceller = threading.Thread(target=cancel_once_results_are_named)
    canceller.start()
    portrait_in(emulator, runtime, group)
    canceller.join(WAIT_S)
    assert cancels == [[]]
    [job] = jobs_in_chat(url, group["id"])
    assert job.status == JobStatus.DONE
    assert len(emulator.calls_to("sendPhoto", group["id"])) == 1
    assert job.result_file_ids and job.result_paths


# 3. A database away when a message is taken.


def test_a_message_taken_while_the_database_blinks_starts_its_job_once_it_answers(
    emulator: BotApiEmulator, runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Away for less than the record retries: the start waits for it, and the job is made."""
    monkeypatch.setattr(service, "RECORD_RETRY_WAITS_S", (0.01, 0.01, 0.01))
    refusals = [1, 2]
    monkeypatch.setattr(
        jobs, "start_job", _away_while(lambda: bool(refusals and refusals.pop()), jobs.start_job)
    )
    job_id, chat_id = _portrait(emulator, runtime, 1911)
    run_job(runtime, job_id)
    assert refusals == []
    [job] = jobs_in_chat(runtime.settings.resolved_database_url, chat_id)
    assert (job.status, job.attempts) == (JobStatus.DONE, 1)
    assert len(emulator.calls_to("sendPhoto", chat_id)) == 1


def test_a_message_taken_while_the_database_is_away_is_sent_again_not_dropped(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Away for longer than the retries: the generate task fails, and its base sends the
    message again (acks_late would acknowledge a failed task's message: the job would wait
    for the reconciler's republish, ten minutes on). Run eagerly here: the retry runs at once."""
    settings = worker_settings(emulator, tmp_path, tiny_model, image_size=64, default_steps=2)
    upgrade_to_head(settings.resolved_database_url)
    monkeypatch.setattr(tasks, "settings", settings)
    tasks.runtime.cache_clear()
    worker = tasks.runtime()
    worker.__dict__["classifier"] = Flags(flagged=False)
    try:
        monkeypatch.setattr(service, "RECORD_RETRY_WAITS_S", (0.01, 0.01, 0.01))
        # One whole task's tries fail (its first try and each retry of the record).
        refusals = [1] * (1 + len(service.RECORD_RETRY_WAITS_S))
        refused = _away_while(lambda: bool(refusals and refusals.pop()), jobs.start_job)
        monkeypatch.setattr(jobs, "start_job", refused)
        job_id, chat_id = _portrait(emulator, worker, 1912)
        result = tasks.generate_images_task.apply(args=[job_id])
        assert result.successful(), result.traceback
        assert refusals == []
        [job] = jobs_in_chat(settings.resolved_database_url, chat_id)
        assert (job.status, job.attempts) == (JobStatus.DONE, 1)
        assert len(emulator.calls_to("sendPhoto", chat_id)) == 1
    finally:
        worker.close()
        tasks.runtime.cache_clear()


# 4. A database away for longer than the retries when a job ends.


def test_a_failure_the_database_could_not_take_is_recorded_once_it_answers(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The results record fails, then the failure's record too: the job would stay running
    on this live worker, which nothing ends. Once the database answers, the worker's next
    heartbeat fails it, with the apology and the credits back."""
    settings = worker_settings(
        emulator,
        tmp_path,
        tiny_model,
        image_size=64,
        default_steps=2,
        heartbeat_interval=0.2,
        worker_stale_after=60,
    )
    upgrade_to_head(settings.resolved_database_url)
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    runtime.__dict__["classifier"] = Flags(flagged=False)
    monkeypatch.setattr(service, "RECORD_RETRY_WAITS_S", (0.01, 0.01, 0.01))
    down = threading.Event()
    down.set()
    monkeypatch.setattr(jobs, "record_results", _away_while(down.is_set, jobs.record_results))
    monkeypatch.setattr(jobs, "fail_job", _away_while(down.is_set, jobs.fail_job))
    try:
        job_id, chat_id = _portrait(emulator, runtime, 1921)
        run_job(runtime, job_id)
        [job] = jobs_in_chat(settings.resolved_database_url, chat_id)
        assert job.status == JobStatus.RUNNING and len(runtime.ends_to_record) == 1
        runtime.start_heartbeat()
        time.sleep(0.5)  # beats while the database is still away (for these records)
        assert len(runtime.ends_to_record) == 1
        down.clear()  # the database is back
        deadline = time.monotonic() + WAIT_S
        while runtime.ends_to_record and time.monotonic() < deadline:
            time.sleep(0.05)
        [job] = jobs_in_chat(settings.resolved_database_url, chat_id)
        assert job.status == JobStatus.FAILED and job.status_message_id is not None
        assert emulator.calls_to("sendPhoto", chat_id) == []
        apology = text("en", "error.generation_failed", job_id=job_id)
        assert emulator.messages[(chat_id, job.status_message_id)]["text"] == apology
    finally:
        runtime.close()


def test_a_failure_left_unrecorded_is_recorded_by_the_next_task(
    emulator: BotApiEmulator, runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "RECORD_RETRY_WAITS_S", (0.01, 0.01, 0.01))
    down = threading.Event()
    down.set()
    monkeypatch.setattr(jobs, "record_results", _away_while(down.is_set, jobs.record_results))
    monkeypatch.setattr(jobs, "fail_job", _away_while(down.is_set, jobs.fail_job))
    first, chat_id = _portrait(emulator, runtime, 1922)
    run_job(runtime, first)
    down.clear()
    second, other_chat = _portrait(emulator, runtime, 1923)
    run_job(runtime, second)
    url = runtime.settings.resolved_database_url
    assert [job.status for job in jobs_in_chat(url, chat_id)] == [JobStatus.FAILED]
    assert [job.status for job in jobs_in_chat(url, other_chat)] == [JobStatus.DONE]
    assert runtime.ends_to_record == []


# 5. A record whose commit is written but whose answer is lost.


def test_a_failure_whose_commit_answer_is_lost_is_still_apologised_for(
    emulator: BotApiEmulator, runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry finds the job failed by this very record: the user is told, once."""
    user = emulator.user(1931, "Anil")
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/portrait a lighthouse")
    status = emulator.history_message(chat, None, "Queued.")
    plan = GenerationPlan("a lighthouse", 60, 60, 2, (1,), 7.0)  # refused by diffusers
    origin = Origin("telegram", chat["id"], "private", "1931", "Anil", "en", command["message_id"])
    with runtime.store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, origin, JobKind.PORTRAIT, plan).job_id
        jobs.attach_status_message(uow, job_id, status["message_id"])
    monkeypatch.setattr(service, "RECORD_RETRY_WAITS_S", (0.01, 0.01, 0.01))
    monkeypatch.setattr(jobs, "fail_job", _written_but_answer_lost(jobs.fail_job))
    run_job(runtime, job_id)
    [job] = jobs_in_chat(runtime.settings.resolved_database_url, chat["id"])
    assert job.status == JobStatus.FAILED
    apology = text("en", "error.generation_failed", job_id=job_id)
    assert emulator.messages[(chat["id"], status["message_id"])]["text"] == apology
    edits = emulator.calls_to("editMessageText", chat["id"])
    assert [edit.params["text"] for edit in edits].count(apology) == 1


def test_an_end_whose_commit_answer_is_lost_stands(
    emulator: BotApiEmulator,
    runtime: WorkerRuntime,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The retry finds the job done by this very record: that is its end, not an error."""
    monkeypatch.setattr(service, "RECORD_RETRY_WAITS_S", (0.01, 0.01, 0.01))
    monkeypatch.setattr(jobs, "complete_job", _written_but_answer_lost(jobs.complete_job))
    job_id, chat_id = _portrait(emulator, runtime, 1932)
    with caplog.at_level(logging.ERROR, logger="workers"):
        run_job(runtime, job_id)
    [job] = jobs_in_chat(runtime.settings.resolved_database_url, chat_id)
    assert job.status == JobStatus.DONE
    assert len(emulator.calls_to("sendPhoto", chat_id)) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_delivered_job_whose_end_and_hand_back_wait_out_an_outage_is_handed_back_after(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its photo was sent and its delivery recorded; then the database went away for longer
    than the retries, so neither its end nor its hand-back could be written. Once the
    database answers, the next task hands it back and publishes it; its next run records
    the end and sends nothing again."""
    settings = worker_settings(emulator, tmp_path, tiny_model, image_size=64, default_steps=2)
    upgrade_to_head(settings.resolved_database_url)
    published: list[int] = []
    runtime = WorkerRuntime(settings, publish=published.append)
    runtime.__dict__["classifier"] = Flags(flagged=False)
    monkeypatch.setattr(service, "RECORD_RETRY_WAITS_S", (0.01, 0.01, 0.01))
    down = threading.Event()
    down.set()
    monkeypatch.setattr(jobs, "complete_job", _away_while(down.is_set, jobs.complete_job))
    hand_back = _away_while(down.is_set, jobs.hand_back_delivered)
    monkeypatch.setattr(jobs, "hand_back_delivered", hand_back)
    try:
        job_id, chat_id = _portrait(emulator, runtime, 1941)
        run_job(runtime, job_id)
        [job] = jobs_in_chat(settings.resolved_database_url, chat_id)
        assert (job.status, published) == (JobStatus.RUNNING, [])
        assert job.delivered_at is not None and len(runtime.ends_to_record) == 1
        down.clear()
        other, _ = _portrait(emulator, runtime, 1942)
        run_job(runtime, other)  # the next task
        assert published == [job_id] and runtime.ends_to_record == []
        run_job(runtime, job_id)  # its message, published again
        [job] = jobs_in_chat(settings.resolved_database_url, chat_id)
        assert (job.status, job.attempts) == (JobStatus.DONE, 2)
        assert len(emulator.calls_to("sendPhoto", chat_id)) == 1
    finally:
        runtime.close()
