"""Finishing behind (CHITRAKAR_FINISH_WHILE_GENERATING): a batch's images are checked, stored
and sent on the worker's finishing lane while its next pipeline call runs; one batch at a
time, and a stopping worker finishes the last one first. The real worker service, tiny model,
SQLite store and Bot API emulator; the content check is a stand-in that waits on the test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from sqlalchemy.exc import OperationalError

from chitrakar.domain import GenerationPlan, JobStatus
from db import heartbeats, jobs, privacy
from db.migrate import upgrade_to_head
from tests.support.botapi import BotApiEmulator
from tests.support.stack import worker_settings
from tests.support.worker import QueuedJobs
from workers import runtime as runtime_module
from workers import service
from workers.classifier import ImageVerdict
from workers.runtime import WorkerRuntime
from workers.service import run_job

WAIT_S = 10.0
NOT_FLAGGED = ImageVerdict(flagged=False, labels=(), score=0.0)


class HeldCheck:
    """A content check that holds each job's images until the test lets it go (or WAIT_S)."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.entered = threading.Event()
        self.let_go_in_time: list[bool] = []

    def classify_all(self, images: list[Image.Image]) -> list[ImageVerdict]:
        self.entered.set()
        self.let_go_in_time.append(self.go.wait(WAIT_S))
        return [NOT_FLAGGED for _ in images]


class Worker(QueuedJobs):
    def portrait(self, user_id: int, prompt: str, handed_over: bool = True) -> int:
        plan = GenerationPlan(prompt, 64, 64, 2, (user_id,), 7.0)
        return self.job(user_id, plan, handed_over, limit=1)

    def status(self, job_id: int) -> JobStatus:
        return JobStatus(self.view(job_id).status)

    def photos(self, job_id: int) -> int:
        return len(self.emulator.calls_to("sendPhoto", self.chats[job_id]))


def _worker(
    emulator: BotApiEmulator,
    tmp_path: Path,
    tiny_model: Path,
    choice: str,
    batch: int = 1,
    published: list[int] | None = None,
) -> Worker:
    settings = worker_settings(
        emulator, tmp_path, tiny_model, max_batch_images=batch, finish_while_generating=choice
    )
    upgrade_to_head(settings.resolved_database_url)
    publish = published.append if published is not None else lambda _job_id: None
    return Worker(emulator, WorkerRuntime(settings, publish=publish))


@pytest.fixture
def behind(emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path) -> Iterator[Worker]:
    worker = _worker(emulator, tmp_path, tiny_model, "on")
    worker.runtime.__dict__["classifier"] = HeldCheck()
    try:
        yield worker
    finally:
        worker.runtime.classifier.go.set()  # type: ignore[attr-defined]
        worker.runtime.close()


def _pipeline_calls(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Each pipeline call's start and end, as they happen."""
    calls: list[tuple[float, float]] = []
    pipe = worker.runtime.pipeline.text2image
    real = type(pipe).__call__

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        try:
            return real(self, *args, **kwargs)
        finally:
            calls.append((start, time.monotonic()))

    monkeypatch.setattr(type(pipe), "__call__", timed)
    return calls


def test_the_next_pipeline_call_runs_while_a_batch_is_finished(
    behind: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    check: HeldCheck = behind.runtime.classifier  # type: ignore[assignment]
    calls = _pipeline_calls(behind, monkeypatch)
    first, second = behind.portrait(971, "a kingfisher"), behind.portrait(972, "a ferry")

    run_job(behind.runtime, first)
    # The task has returned with its job still being checked: nothing sent yet.
    assert check.entered.wait(WAIT_S)
    assert behind.status(first) == JobStatus.RUNNING and behind.photos(first) == 0

    # The next task's pipeline call runs meanwhile; its task then waits for the first job's
    # finishing before it hands its own in (one batch on the lane at a time).
    task = threading.Thread(target=run_job, args=(behind.runtime, second))
    task.start()
    deadline = time.monotonic() + WAIT_S
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 2, "the second pipeline call waited for the first job's check"
    time.sleep(0.3)
    assert task.is_alive(), "a second batch was handed in while the first was finishing"
    assert behind.photos(first) == 0

    check.go.set()
    task.join(WAIT_S)
    assert not task.is_alive()
    behind.runtime.finishing.wait()
    assert [behind.status(job) for job in (first, second)] == [JobStatus.DONE] * 2
    assert [behind.photos(job) for job in (first, second)] == [1, 1]
    assert check.let_go_in_time == [True, True]


def test_a_batch_mates_own_message_does_not_start_it_again_while_it_is_finished(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    """The database says the companion runs on this worker, which is what a job whose task
    died looks like: its own message, arriving while the batch is still being sent, must
    leave it to the lane."""
    worker = _worker(emulator, tmp_path, tiny_model, "on", batch=2)
    check = HeldCheck()
    worker.runtime.__dict__["classifier"] = check
    try:
        leader, companion = worker.portrait(975, "a tabla"), worker.portrait(976, "a sitar")
        run_job(worker.runtime, leader)
        assert check.entered.wait(WAIT_S)
        assert worker.view(companion).status == JobStatus.RUNNING  # batched, being checked

        run_job(worker.runtime, companion)  # its own message
        assert worker.view(companion).attempts == 1
        assert worker.runtime.finishing.holds(companion)

        check.go.set()
        worker.runtime.finishing.wait()
        assert not worker.runtime.finishing.holds(companion)
        for job in (leader, companion):
            view = worker.view(job)
            assert (view.status, view.attempts, worker.photos(job)) == (JobStatus.DONE, 1, 1)
        assert check.let_go_in_time == [True] * 2  # each job's own check
        run_job(worker.runtime, companion)  # a late duplicate: it has ended
        assert worker.photos(companion) == 1
    finally:
        check.go.set()
        worker.runtime.close()


def test_a_stopping_worker_finishes_the_batch_behind_first(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    """And only then does its heartbeat go (until then its jobs are its own), and its user's
    held job is handed over, as when a job ends inline."""
    published: list[int] = []
    worker = _worker(emulator, tmp_path, tiny_model, "on", published=published)
    check = HeldCheck()
    worker.runtime.__dict__["classifier"] = check
    runtime = worker.runtime
    runtime.start_heartbeat()
    job = worker.portrait(973, "a lantern")
    held = worker.portrait(973, "a lantern at dawn", handed_over=False)
    try:
        run_job(runtime, job)
        assert check.entered.wait(WAIT_S)
        assert worker.status(job) == JobStatus.RUNNING

        closing = threading.Thread(target=runtime.close)
        closing.start()
        time.sleep(0.3)
        assert closing.is_alive(), "the worker stopped with a job still being finished"
        with runtime.store.unit_of_work() as uow:
            assert runtime.name in heartbeats.alive(uow, datetime.now(UTC) - timedelta(hours=1))
        assert published == []
        check.go.set()
        closing.join(WAIT_S)
        assert not closing.is_alive()
        assert worker.status(job) == JobStatus.DONE and worker.photos(job) == 1
        assert published == [held]
        with runtime.store.unit_of_work() as uow:
            assert heartbeats.alive(uow, datetime.now(UTC) - timedelta(hours=1)) == set()
    finally:
        check.go.set()
        runtime.close()


def test_a_batch_mate_handed_back_meanwhile_is_run_by_its_message(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler took this worker for dead during the batch's pipeline call and handed
    its jobs back: the lane sends nothing for them, and the companion's new message waits
    for the lane to let go of it, then runs it, once."""
    worker = _worker(emulator, tmp_path, tiny_model, "on", batch=2)
    check = HeldCheck()
    worker.runtime.__dict__["classifier"] = check
    pipe = worker.runtime.pipeline.text2image
    real = type(pipe).__call__
    handed: list[int] = []

    def then_handed_back(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = real(self, *args, **kwargs)
        if not handed:
            with worker.runtime.store.unit_of_work() as uow:
                # No heartbeat was written: the worker looks dead.
                handed.extend(jobs.hand_back_from_dead_workers(uow, set()))
        return output

    monkeypatch.setattr(type(pipe), "__call__", then_handed_back)
    try:
        leader, companion = worker.portrait(977, "a dhow"), worker.portrait(978, "a coracle")
        run_job(worker.runtime, leader)
        assert sorted(handed) == [leader, companion]
        assert check.entered.wait(WAIT_S)
        assert worker.runtime.finishing.holds(companion)

        _run_after_the_lane(worker, check, companion)
        worker.runtime.finishing.wait()
        view = worker.view(companion)
        assert (view.status, view.attempts, worker.photos(companion)) == (JobStatus.DONE, 2, 1)
        assert worker.status(leader) == JobStatus.QUEUED and worker.photos(leader) == 0
    finally:
        check.go.set()
        worker.runtime.close()


def _batch_of_two_behind(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, published: list[int]
) -> tuple[Worker, HeldCheck]:
    worker = _worker(emulator, tmp_path, tiny_model, "on", batch=2, published=published)
    check = HeldCheck()
    worker.runtime.__dict__["classifier"] = check
    return worker, check


def _run_after_the_lane(worker: Worker, check: HeldCheck, job_id: int) -> None:
    """Run the job's own message in a thread named "message" while the lane holds its batch:
    it must wait for the lane, and end once the check lets the batch go."""
    message = threading.Thread(target=run_job, args=(worker.runtime, job_id), name="message")
    message.start()
    time.sleep(0.3)
    assert message.is_alive(), "the message did not wait for the lane"
    check.go.set()
    message.join(WAIT_S)
    assert not message.is_alive()


def _failing_for(job_id: int, real: Any) -> Any:
    def write(uow: Any, one: int, *args: Any, **kwargs: Any) -> Any:
        if one == job_id:
            raise RuntimeError("the record could not be written")
        return real(uow, one, *args, **kwargs)

    return write


def test_a_delivered_job_whose_end_was_not_recorded_is_handed_back_and_published(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own message came while the batch was finished and found it the lane's. Handed
    back and published again, it records its end on whichever worker takes it, and is not
    sent twice."""
    published: list[int] = []
    worker, check = _batch_of_two_behind(emulator, tmp_path, tiny_model, published)
    leader, companion = worker.portrait(979, "a veena"), worker.portrait(980, "a flute")
    monkeypatch.setattr(jobs, "complete_job", _failing_for(companion, jobs.complete_job))
    try:
        run_job(worker.runtime, leader)
        assert check.entered.wait(WAIT_S)
        run_job(worker.runtime, companion)  # its message: the lane's
        check.go.set()
        worker.runtime.finishing.wait()
        assert worker.status(companion) == JobStatus.QUEUED  # not left running on this worker
        assert published == [companion]

        monkeypatch.undo()
        run_job(worker.runtime, companion)  # the message published again
        worker.runtime.finishing.wait()
        view = worker.view(companion)
        assert (view.status, view.attempts, worker.photos(companion)) == (JobStatus.DONE, 2, 1)
        assert worker.status(leader) == JobStatus.DONE
    finally:
        check.go.set()
        worker.runtime.close()


def test_a_job_sent_but_not_recorded_delivered_is_never_published_again(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether its photo went out cannot be told from the database: made again, it could
    arrive twice. It stays running, as a job left so inline does."""
    published: list[int] = []
    worker, check = _batch_of_two_behind(emulator, tmp_path, tiny_model, published)
    leader, companion = worker.portrait(981, "a santoor"), worker.portrait(982, "a shehnai")
    monkeypatch.setattr(jobs, "mark_delivered", _failing_for(companion, jobs.mark_delivered))
    worker.runtime.start_heartbeat()  # alive: its jobs are not another worker's to take
    try:
        check.go.set()
        run_job(worker.runtime, leader)
        worker.runtime.finishing.wait()
        assert worker.photos(companion) == 1
        assert worker.status(companion) == JobStatus.RUNNING
        assert published == []
        # Its own message, after the lane has let go of it: not made and sent again.
        run_job(worker.runtime, companion)
        worker.runtime.finishing.wait()
        assert worker.photos(companion) == 1
        view = worker.view(companion)
        assert (view.status, view.attempts) == (JobStatus.RUNNING, 1)
    finally:
        worker.runtime.close()


def test_a_batch_mates_message_that_cannot_look_at_its_job_waits_for_the_lane(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database does not answer the message's first look: it waits for the lane to let
    go of the job, then finds it done; nothing is lost, made or sent twice."""
    worker, check = _batch_of_two_behind(emulator, tmp_path, tiny_model, [])
    leader, companion = worker.portrait(988, "a nadaswaram"), worker.portrait(989, "a ghatam")
    real, failed = jobs.running_state, []

    def away_once(uow: Any, job_id: int) -> Any:
        # The message's first look only: the lane looks at its jobs too (cancellations).
        if threading.current_thread().name == "message" and not failed:
            failed.append(job_id)
            raise OperationalError("SELECT jobs", {}, Exception("the connection was lost"))
        return real(uow, job_id)

    try:
        run_job(worker.runtime, leader)
        assert check.entered.wait(WAIT_S)
        monkeypatch.setattr(jobs, "running_state", away_once)
        _run_after_the_lane(worker, check, companion)
        assert failed == [companion]
        view = worker.view(companion)
        assert (view.status, view.attempts, worker.photos(companion)) == (JobStatus.DONE, 1, 1)
    finally:
        check.go.set()
        worker.runtime.close()


def test_a_delivered_job_whose_end_fails_again_in_its_own_task_is_handed_back(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its task only has the end to record, and that fails: the error escapes the task, and
    the job goes back to the queue to be recorded by another try, not left running on a live
    worker with nothing to rescue it. Nothing is sent again."""
    published: list[int] = []
    worker = _worker(emulator, tmp_path, tiny_model, "off", published=published)
    job = worker.portrait(987, "a harmonium")
    alive_since = datetime.now(UTC) - timedelta(minutes=1)
    with worker.runtime.store.unit_of_work() as uow:
        assert jobs.start_job(uow, job, worker.runtime.name, alive_since) is not None
    with worker.runtime.store.unit_of_work() as uow:
        jobs.mark_delivered(uow, job, worker.chats[job], ["file-1"], [41])
        uow.commit()
    monkeypatch.setattr(jobs, "complete_job", _failing_for(job, jobs.complete_job))
    worker.runtime.start_heartbeat()
    try:
        with pytest.raises(RuntimeError, match="the record could not be written"):
            run_job(worker.runtime, job)
        assert (worker.status(job), published, worker.photos(job)) == (JobStatus.QUEUED, [job], 0)
    finally:
        worker.runtime.close()


def test_a_batch_whose_companions_cannot_be_claimed_runs_its_leader_alone(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fails while companions are claimed (after the claim was written, the
    worst case): the leader is made and sent alone instead of staying running with nobody
    making it, and the companion claimed unseen is handed back and published again. Left
    running on this live worker, its own message, taken by another worker, would have done
    nothing, and the job stayed running for good."""
    published: list[int] = []
    worker = _worker(emulator, tmp_path, tiny_model, "off", batch=2, published=published)
    worker.runtime.__dict__["classifier"] = HeldCheck()
    worker.runtime.classifier.go.set()  # type: ignore[attr-defined]
    real = jobs.claim_batch

    def claimed_then_failed(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise OperationalError("UPDATE jobs", {}, Exception("the connection was lost"))

    monkeypatch.setattr(jobs, "claim_batch", claimed_then_failed)
    worker.runtime.start_heartbeat()
    try:
        held = worker.portrait(987, "a veena")
        with worker.runtime.store.unit_of_work() as uow:  # another batch's, left unmade
            jobs.start_job(uow, held, worker.runtime.name, datetime.now(UTC))
        leader, companion = worker.portrait(985, "a tabla"), worker.portrait(986, "a sitar")
        run_job(worker.runtime, leader)
        assert (worker.status(leader), worker.photos(leader)) == (JobStatus.DONE, 1)
        assert (worker.status(companion), published) == (JobStatus.QUEUED, [companion])
        assert worker.status(held) == JobStatus.RUNNING  # started before the leader: not its
        run_job(worker.runtime, companion)
        assert (worker.status(companion), worker.photos(companion)) == (JobStatus.DONE, 1)
    finally:
        worker.runtime.close()


def test_claims_that_cannot_be_handed_back_are_handed_back_by_the_next_task(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long outage: the claim's answer is lost and handing it back fails too. The next
    task, once the database is back, hands it back before anything else."""
    published: list[int] = []
    worker = _worker(emulator, tmp_path, tiny_model, "off", batch=2, published=published)
    worker.runtime.__dict__["classifier"] = HeldCheck()
    worker.runtime.classifier.go.set()  # type: ignore[attr-defined]
    real_claim, real_hand_back = jobs.claim_batch, jobs.hand_back_unseen_claims
    lost = OperationalError("UPDATE jobs", {}, Exception("the connection was lost"))

    def claimed_then_failed(*args: Any, **kwargs: Any) -> Any:
        real_claim(*args, **kwargs)
        raise lost

    def database_away(*args: Any, **kwargs: Any) -> Any:
        raise lost

    monkeypatch.setattr(service, "RECORD_RETRY_WAITS_S", ())
    monkeypatch.setattr(jobs, "claim_batch", claimed_then_failed)
    monkeypatch.setattr(jobs, "hand_back_unseen_claims", database_away)
    worker.runtime.start_heartbeat()
    try:
        leader, companion = worker.portrait(988, "a flute"), worker.portrait(989, "a harp")
        run_job(worker.runtime, leader)
        assert (worker.status(leader), worker.status(companion)) == (
            JobStatus.DONE,
            JobStatus.RUNNING,
        )
        assert published == []

        monkeypatch.setattr(jobs, "claim_batch", real_claim)
        monkeypatch.setattr(jobs, "hand_back_unseen_claims", real_hand_back)
        next_one = worker.portrait(990, "a drum")
        run_job(worker.runtime, next_one)
        assert published == [companion] and worker.status(companion) == JobStatus.QUEUED
        assert worker.runtime.claims_to_hand_back == []
        assert worker.status(next_one) == JobStatus.DONE
    finally:
        worker.runtime.close()


def test_a_message_for_a_job_that_has_ended_does_not_wait_for_the_lane(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    """The companion was cancelled while its batch is being finished: its message has
    nothing to do and must not hold the worker's next pipeline call until the lane is done."""
    worker, check = _batch_of_two_behind(emulator, tmp_path, tiny_model, [])
    leader, companion = worker.portrait(983, "a sarangi"), worker.portrait(984, "a mridangam")
    try:
        run_job(worker.runtime, leader)
        assert check.entered.wait(WAIT_S)
        with worker.runtime.store.unit_of_work() as uow:
            assert jobs.cancel_jobs(uow, "telegram", worker.chats[companion], "984")
        message = threading.Thread(target=run_job, args=(worker.runtime, companion))
        message.start()
        message.join(WAIT_S / 2)
        assert not message.is_alive(), "the message waited for the lane"
        assert worker.runtime.finishing.holds(leader)
        check.go.set()
        worker.runtime.finishing.wait()
        # Cancelled after the last look, as inline: what it sent is recorded, not undone.
        assert worker.status(companion) == JobStatus.CANCELLED
        assert worker.photos(leader) == 1
    finally:
        check.go.set()
        worker.runtime.close()


def test_finishing_runs_behind_only_where_the_model_is_on_a_gpu(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def lane(choice: str, device: str) -> bool:
        monkeypatch.setattr(runtime_module, "resolve_device", lambda _: torch.device(device))
        worker = _worker(emulator, tmp_path / f"{choice}-{device}", tiny_model, choice)
        try:
            return worker.runtime.finishing.behind
        finally:
            worker.runtime.close()

    assert lane("auto", "cpu") is False  # the pipeline and the check would share the cores
    assert lane("auto", "cuda") is True
    assert lane("on", "cpu") is True
    assert lane("off", "cuda") is False


def test_inline_the_task_returns_with_its_job_sent(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    worker = _worker(emulator, tmp_path, tiny_model, "off")
    try:
        job = worker.portrait(974, "a conch")
        run_job(worker.runtime, job)
        assert worker.status(job) == JobStatus.DONE and worker.photos(job) == 1
    finally:
        worker.runtime.close()


def test_a_job_whose_user_is_forgotten_while_it_is_checked_sends_and_keeps_nothing(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    """/forget confirmed after the job's last look for a cancellation, while its images are
    checked and stored: nothing of it reaches the chat, and what was stored is deleted."""
    worker = _worker(emulator, tmp_path, tiny_model, "off")
    check = HeldCheck()
    worker.runtime.__dict__["classifier"] = check
    try:
        job = worker.portrait(975, "a shehnai")
        task = threading.Thread(target=run_job, args=(worker.runtime, job))
        task.start()
        assert check.entered.wait(WAIT_S)
        with worker.runtime.store.unit_of_work() as uow:
            assert privacy.delete(uow.session, "telegram", "975", date.today()) is not None
            uow.commit()
        check.go.set()
        task.join(WAIT_S)
        assert not task.is_alive()
        assert worker.photos(job) == 0
        assert worker.runtime.artifacts.keys(f"results/{job}/") == []
    finally:
        check.go.set()
        worker.runtime.close()


def test_a_delivery_the_database_could_not_record_is_recorded_once_it_answers(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The photo went out, then the database stayed away past the retries: the job stayed
    running on this live worker, holding its user's place, until the worker stopped and it
    was made and sent again. Its delivery and end are recorded once the database answers."""
    worker = _worker(emulator, tmp_path, tiny_model, "off")
    worker.runtime.__dict__["classifier"] = HeldCheck()
    worker.runtime.classifier.go.set()  # type: ignore[attr-defined]
    real_mark = jobs.mark_delivered
    lost = OperationalError("UPDATE jobs", {}, Exception("the connection was lost"))

    def database_away(*args: Any, **kwargs: Any) -> Any:
        raise lost

    monkeypatch.setattr(service, "RECORD_RETRY_WAITS_S", ())
    monkeypatch.setattr(jobs, "mark_delivered", database_away)
    try:
        job = worker.portrait(996, "a veena")
        run_job(worker.runtime, job)
        assert (worker.status(job), worker.photos(job)) == (JobStatus.RUNNING, 1)
        worker.runtime.record_ends_left()  # still away: kept for later
        assert len(worker.runtime.ends_to_record) == 1

        monkeypatch.setattr(jobs, "mark_delivered", real_mark)
        worker.runtime.record_ends_left()
        assert worker.runtime.ends_to_record == []
        assert (worker.status(job), worker.photos(job)) == (JobStatus.DONE, 1)
        with worker.runtime.store.unit_of_work() as uow:
            done = jobs.get_job(uow, job)
            assert done is not None and done.delivered and done.result_file_ids
    finally:
        worker.runtime.close()
