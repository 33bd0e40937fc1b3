"""The reconciler and redelivered tasks on real databases (SQLite and PostgreSQL): a dead
worker's job goes back to the queue, a lost message is published again, a live worker's job is
never started twice, and a result already delivered is never sent twice."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from chitrakar.config import Settings
from chitrakar.domain import GenerationPlan, JobKind, JobStatus
from chitrakar.services import reconcile
from db import heartbeats, jobs
from db.jobs import Origin
from db.migrate import upgrade_to_head
from db.models import Job, WorkerHeartbeat, utcnow
from db.session import Store
from tests.support.botapi import BotApiEmulator
from tests.support.stack import jobs_in_chat, worker_settings
from workers.runtime import Heartbeat, WorkerRuntime
from workers.service import run_job

SETTINGS = Settings(worker_stale_after=60, republish_after=600)
PLAN = GenerationPlan("a lighthouse", 64, 64, 2, (1,), 7.0)


def new_job(store: Store, message_id: int, chat_id: int = 5) -> int:
    origin = Origin("telegram", chat_id, "private", str(chat_id), "Anil", "en", message_id)
    with store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, origin, JobKind.PORTRAIT, PLAN).job_id
    with store.unit_of_work() as uow:
        assert jobs.claim_hand_over(uow, job_id, 10)
    return job_id


def beat(store: Store, name: str, ago_s: float = 0) -> None:
    with store.unit_of_work() as uow:
        heartbeats.beat(uow, name)
        uow.session.execute(
            update(WorkerHeartbeat)
            .where(WorkerHeartbeat.name == name)
            .values(beat_at=utcnow() - timedelta(seconds=ago_s))
        )
        uow.commit()


def start(store: Store, job_id: int, worker: str) -> jobs.JobView | None:
    with store.unit_of_work() as uow:
        return jobs.start_job(uow, job_id, worker, utcnow() - timedelta(seconds=60))


def published_ago(store: Store, job_id: int, seconds: float) -> None:
    with store.unit_of_work() as uow:
        uow.session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(published_at=utcnow() - timedelta(seconds=seconds))
        )
        uow.commit()


def status_of(store: Store, job_id: int) -> tuple[JobStatus, int]:
    with store.unit_of_work() as uow:
        job = jobs.get_job(uow, job_id)
    assert job is not None
    return job.status, job.attempts


def test_a_live_workers_job_is_not_started_again_but_a_dead_ones_is(store: Store) -> None:
    job_id = new_job(store, 1)
    beat(store, "worker-a")
    assert start(store, job_id, "worker-a") is not None
    # A duplicate message reaches worker B while A, alive, runs the job: B leaves it alone.
    assert start(store, job_id, "worker-b") is None
    assert status_of(store, job_id) == (JobStatus.RUNNING, 1)
    # A stops beating (killed): the redelivered message starts the job again on B.
    beat(store, "worker-a", ago_s=120)
    restarted = start(store, job_id, "worker-b")
    assert restarted is not None and restarted.worker == "worker-b"
    assert status_of(store, job_id) == (JobStatus.RUNNING, 2)


def test_the_reconciler_hands_back_dead_workers_jobs_and_republishes_lost_messages(
    store: Store,
) -> None:
    dead_job, live_job, lost_job, fresh_job = (new_job(store, n) for n in (1, 2, 3, 4))
    beat(store, "dead")
    beat(store, "live")
    start(store, dead_job, "dead")
    start(store, live_job, "live")
    beat(store, "dead", ago_s=61)
    published_ago(store, lost_job, 601)
    published_ago(store, fresh_job, 30)
    published: list[int] = []

    report = reconcile(store, published.append, SETTINGS)

    assert report.handed_back == [dead_job] and report.republished == [lost_job]
    assert sorted(published) == sorted([dead_job, lost_job])
    assert status_of(store, dead_job) == (JobStatus.QUEUED, 1)  # attempts kept
    assert status_of(store, live_job) == (JobStatus.RUNNING, 1)
    # Run again at once: nothing new (each was just published).
    assert reconcile(store, published.append, SETTINGS).handed_back == []
    assert len(published) == 2
    # The handed-back job starts on another worker as attempt 2.
    assert start(store, dead_job, "other") is not None
    assert status_of(store, dead_job) == (JobStatus.RUNNING, 2)


def test_a_publish_that_fails_is_tried_again_in_a_later_round(store: Store) -> None:
    job_id = new_job(store, 1)
    published_ago(store, job_id, 601)

    def broker_down(_: int) -> None:
        raise ConnectionError("broker away")

    assert reconcile(store, broker_down, SETTINGS).republished == [job_id]
    published: list[int] = []
    assert reconcile(store, published.append, SETTINGS).republished == []
    published_ago(store, job_id, 601)
    assert reconcile(store, published.append, SETTINGS).republished == [job_id]
    assert published == [job_id]


def test_a_delivered_job_redelivered_records_its_end_and_sends_nothing_again(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    settings = worker_settings(
        emulator,
        tmp_path,
        tiny_model,
    )
    upgrade_to_head(settings.resolved_database_url)
    user = emulator.user(901, "Anil")
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/portrait a lighthouse")
    origin = Origin("telegram", chat["id"], "private", "901", "Anil", "en", command["message_id"])
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    try:
        with runtime.store.unit_of_work() as uow:
            job_id = jobs.take_in(uow, origin, JobKind.PORTRAIT, PLAN).job_id
        run_job(runtime, job_id)
        assert len(emulator.calls_to("sendPhoto", chat["id"])) == 1
        # As if the worker had died after sending, before recording the end: the job is
        # running again, with its delivery recorded, when its message comes back.
        with runtime.store.unit_of_work() as uow:
            uow.session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status=JobStatus.RUNNING, worker="dead", finished_at=None)
            )
            uow.commit()
        run_job(runtime, job_id)
    finally:
        runtime.close()

    assert len(emulator.calls_to("sendPhoto", chat["id"])) == 1
    [job] = jobs_in_chat(settings.resolved_database_url, chat["id"])
    assert job.status == "done" and job.delivered_at is not None
    assert job.result_file_ids and len(job.result_paths or []) == 1


class DatabaseAway(Store):
    """A store whose database can be taken away and given back."""

    away = False

    def unit_of_work(self):  # type: ignore[no-untyped-def]
        if self.away:
            raise OperationalError("SELECT 1", {}, Exception("the database is away"))
        return super().unit_of_work()


def test_after_the_database_was_away_the_reconciler_waits_for_the_other_workers_to_beat(
    tmp_path: Path,
) -> None:
    """When the database comes back, every live worker's last beat is old: reconciling at
    once took them all for dead and handed their running jobs back to the queue. It waits
    until they have had `quiet_after_outage` to beat again; before the outage it ran."""
    url = f"sqlite:///{tmp_path / 'beats.db'}"
    upgrade_to_head(url)
    store = DatabaseAway(url)
    rounds: list[float] = []
    heartbeat = Heartbeat(
        store, "w1", 0.02, lambda: rounds.append(time.monotonic()), 0.02, quiet_after_outage=1.5
    )
    heartbeat.start()
    try:
        deadline = time.monotonic() + 10
        while not rounds and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rounds, "no reconciler round while the database was there"
        store.away = True
        time.sleep(0.3)
        store.away = False
        back = time.monotonic()
        time.sleep(1.0)
        assert all(at < back for at in rounds[-1:]), "a round soon after the database came back"
        deadline = time.monotonic() + 10
        while rounds[-1] < back and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rounds[-1] - back >= 1.5
    finally:
        heartbeat.stop()
        store.dispose()
