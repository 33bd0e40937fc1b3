"""Fair queueing and cancelling, with the real intake, store and worker service: one user's
flood is held back in the database, and a cancelled job stops, refunded, even mid-run."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
from sqlalchemy import event

from chitrakar.artifacts import LocalArtifactStore
from chitrakar.config import Settings
from chitrakar.domain import Command, JobStatus, parse_image_command
from chitrakar.media import MediaStore
from chitrakar.quota import Account
from chitrakar.services import JobIntake, hand_over_all_held, hand_over_held
from chitrakar.styles import load_catalogue
from db import jobs, ledger
from db.jobs import Origin
from db.migrate import upgrade_to_head
from db.session import Store
from tests.support.botapi import BotApiEmulator
from tests.support.stack import jobs_in_chat, worker_settings
from workers import service
from workers.runtime import WorkerRuntime


def origin(user: str, message_id: int) -> Origin:
    return Origin("telegram", int(user), "private", user, user, "en", message_id)


def intake_for(store: Store, tmp_path: Path, published: deque[int]) -> tuple[JobIntake, Settings]:
    settings = Settings(image_size=64, default_steps=4, data_dir=tmp_path, daily_quota=100)
    intake = JobIntake(
        settings,
        store,
        published.append,
        load_catalogue(),
        MediaStore(settings.media_dir),
        LocalArtifactStore(tmp_path),
    )
    return intake, settings


def test_one_users_flood_does_not_starve_another(store: Store, tmp_path: Path) -> None:
    """User A queues 20 jobs, then user B one: B is served within the next K jobs."""
    broker: deque[int] = deque()
    intake, settings = intake_for(store, tmp_path, broker)
    limit = settings.max_jobs_in_flight
    request = parse_image_command(Command.PORTRAIT, "a crowded market")
    flood = []
    for n in range(20):
        accepted = intake.accept(origin("1", n + 1), request)
        intake.attach_status_message(accepted.job_id, 1000 + n)
        assert intake.dispatch(accepted)
        flood.append(accepted.job_id)
    assert list(broker) == flood[:limit]  # the rest are held in the database
    late = intake.accept(origin("2", 1), request)
    intake.attach_status_message(late.job_id, 2000)
    intake.dispatch(late)

    served = []
    while broker:  # a worker: run the next job in the broker's order, then hand over held ones
        job_id = broker.popleft()
        with store.unit_of_work() as uow:
            jobs.start_job(uow, job_id, "w")
            jobs.complete_job(
                uow, job_id, result_paths=[], result_file_ids=[], generation_seconds=0.1
            )
        served.append(job_id)
        hand_over_held(store, broker.append, job_id, limit)

    assert served.index(late.job_id) <= limit
    assert sorted(served) == sorted([*flood, late.job_id])  # every job ran, once
    store.dispose()


def test_a_command_is_taken_in_with_one_read_and_one_write_transaction(
    store: Store, tmp_path: Path
) -> None:
    """The checks before a job is taken in read in one transaction; the job, its credits and
    its hand-over are written in one more; dispatch then only publishes."""
    broker: deque[int] = deque()
    intake, _settings = intake_for(store, tmp_path, broker)
    request = parse_image_command(Command.PORTRAIT, "a kite over the river")
    intake.accept(origin("11", 1), request)  # the user's row and accounts exist now
    transactions: list[str] = []
    event.listen(store.engine, "begin", lambda _: transactions.append("begin"))
    event.listen(store.engine, "commit", lambda _: transactions.append("commit"))
    accepted = intake.accept(origin("11", 2), request)
    assert transactions == ["begin", "begin", "commit"]
    assert intake.dispatch(accepted)
    assert transactions == ["begin", "begin", "commit"]
    assert list(broker) == [accepted.job_id]
    store.dispose()


def test_cancel_stops_queued_and_held_jobs_and_refunds_them(store: Store, tmp_path: Path) -> None:
    broker: deque[int] = deque()
    intake, settings = intake_for(store, tmp_path, broker)
    request = parse_image_command(Command.PORTRAIT, "a lighthouse --n 2")
    ids = []
    for n in range(3):
        accepted = intake.accept(origin("7", n + 1), request)
        intake.dispatch(accepted)
        ids.append(accepted.job_id)
    account = Account("user:telegram:7", settings.daily_quota)

    def left() -> int | None:
        with store.unit_of_work() as uow:
            return ledger.balance(uow.session, account, intake.quota_day())

    assert left() == 100 - 6
    cancelled = intake.cancel(origin("7", 99))
    assert [job.id for job in cancelled] == ids
    assert left() == 100
    assert intake.cancel(origin("7", 100)) == []  # nothing left to cancel, nothing refunded twice
    assert left() == 100
    with store.unit_of_work() as uow:
        assert jobs.active_job_ids(uow) == []
    store.dispose()


def test_a_job_cancelled_while_it_runs_stops_and_is_refunded(
    emulator: BotApiEmulator,
    tmp_path: Path,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = worker_settings(
        emulator,
        tmp_path,
        tiny_model,
        image_size=64,
        default_steps=8,
    )
    upgrade_to_head(settings.resolved_database_url)
    user = emulator.user(811, "Kiran")
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/portrait a long night")
    published: list[int] = []
    runtime = WorkerRuntime(settings, publish=published.append)
    intake = JobIntake(
        settings,
        runtime.store,
        published.append,
        runtime.catalogue,
        runtime.media,
        runtime.artifacts,
    )
    who = Origin("telegram", chat["id"], "private", "811", "Kiran", "en", command["message_id"])
    accepted = intake.accept(who, parse_image_command(Command.PORTRAIT, "a long night"))
    assert intake.dispatch(accepted)

    steps: list[int] = []
    monkeypatch.setattr(service, "CANCEL_CHECK_INTERVAL_S", 0.0)
    real_progress = runtime.delivery.progress

    def progress(job: jobs.JobView, done: int, total: int) -> None:
        steps.append(done)
        if done == 2:  # the user sends /cancel while the job runs
            intake.cancel(Origin("telegram", chat["id"], "private", "811", "Kiran", "en", 5))
        real_progress(job, done, total)

    monkeypatch.setattr(runtime.delivery, "progress", progress)
    try:
        service.run_job(runtime, accepted.job_id)
    finally:
        runtime.close()

    [job] = jobs_in_chat(settings.resolved_database_url, chat["id"])
    assert job.status == JobStatus.CANCELLED
    assert max(steps) < 8  # stopped, not run to the end
    assert emulator.calls_to("sendPhoto", chat["id"]) == []
    assert not [
        c for c in emulator.calls_to("sendMessage", chat["id"]) if "wrong" in c.params["text"]
    ]
    with runtime.store.unit_of_work() as uow:
        left = ledger.balance(
            uow.session, Account("user:telegram:811", settings.daily_quota), intake.quota_day()
        )
    assert left == settings.daily_quota


def test_a_job_whose_user_is_forgotten_while_it_runs_stops_cleanly(
    emulator: BotApiEmulator,
    tmp_path: Path,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from chitrakar.privacy import PrivacyService

    settings = worker_settings(
        emulator,
        tmp_path,
        tiny_model,
        image_size=64,
        default_steps=6,
    )
    upgrade_to_head(settings.resolved_database_url)
    user = emulator.user(812, "Ravi")
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/portrait a quiet lake")
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    intake = JobIntake(
        settings, runtime.store, lambda _: None, runtime.catalogue, runtime.media, runtime.artifacts
    )
    who = Origin("telegram", chat["id"], "private", "812", "Ravi", "en", command["message_id"])
    accepted = intake.accept(who, parse_image_command(Command.PORTRAIT, "a quiet lake"))
    privacy = PrivacyService(runtime.store, runtime.artifacts, runtime.media, settings.zone)
    monkeypatch.setattr(service, "CANCEL_CHECK_INTERVAL_S", 0.0)
    real_progress = runtime.delivery.progress

    def progress(job: jobs.JobView, done: int, total: int) -> None:
        if done == 2:  # the user sends /forget and confirms while the job runs
            privacy.forget("telegram", "812")
        real_progress(job, done, total)

    monkeypatch.setattr(runtime.delivery, "progress", progress)
    try:
        service.run_job(runtime, accepted.job_id)
    finally:
        runtime.close()
    assert jobs_in_chat(settings.resolved_database_url, chat["id"]) == []
    assert runtime.artifacts.keys("results/") == []
    assert emulator.calls_to("sendPhoto", chat["id"]) == []


def test_a_held_job_whose_hand_over_failed_is_handed_over_later(
    store: Store, tmp_path: Path
) -> None:
    """The broker refused a held job when its turn came: it is held again, and beat's
    periodic hand-over publishes it once the broker is back."""
    broker: deque[int] = deque()
    intake, settings = intake_for(store, tmp_path, broker)
    request = parse_image_command(Command.PORTRAIT, "a kite")
    ids = []
    for n in range(3):
        accepted = intake.accept(origin("3", n + 1), request)
        intake.dispatch(accepted)
        ids.append(accepted.job_id)
    assert list(broker) == ids[:2]
    for job_id in ids[:2]:
        with store.unit_of_work() as uow:
            jobs.start_job(uow, job_id, "w")
            jobs.complete_job(
                uow, job_id, result_paths=[], result_file_ids=[], generation_seconds=0
            )

    def broker_down(_job_id: int) -> None:
        raise ConnectionError("broker down")

    hand_over_held(store, broker_down, ids[1], settings.max_jobs_in_flight)
    assert list(broker) == ids[:2]  # still held
    assert hand_over_all_held(store, broker.append, settings.max_jobs_in_flight) == [ids[2]]
    assert list(broker) == ids
    # Nothing is handed over twice.
    assert hand_over_all_held(store, broker.append, settings.max_jobs_in_flight) == []
    store.dispose()
