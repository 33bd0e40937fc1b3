"""Each fault made to happen for real, with the outcome the user sees asserted: one answer per
request (their images, or an apology with their credits back), never two, and a ledger that
balances. A deployment of separate processes (bot, workers, beat) on a Redis of the test's
own, SQLite for the store, the tiny model, the Bot API emulator."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy import text as sql_text
from sqlalchemy.engine import make_url

from chitrakar.queue import QUEUE
from db.models import Job, JobEvent, LedgerEntry, WorkerHeartbeat
from db.session import Store
from tests.faults.conftest import RedisServer
from tests.support.botapi import BotApiEmulator, Call
from tests.support.stack import (
    chitrakar_env,
    chitrakar_process,
    free_port,
    jobs_in_chat,
    run_chitrakar,
    wait_for_jobs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

# Fast enough to see a dead worker within seconds (production: 10 s, 60 s, 60 s).
FAST_RECOVERY = {
    "heartbeat_interval": "0.5",
    "worker_stale_after": "3",
    "reconcile_interval": "1",
}


def replying_to(command: dict[str, Any]) -> Callable[[Call], bool]:
    def match(call: Call) -> bool:
        reply = call.params.get("reply_parameters") or {}
        return reply.get("message_id") == command["message_id"] and isinstance(call.result, dict)

    return match


class Deployment:
    """Bot, workers and beat as separate processes, started and stopped by the test."""

    def __init__(self, env: dict[str, str], folder: Path, stack: ExitStack) -> None:
        self.env, self.folder, self._stack = env, folder, stack
        self.database_url = f"sqlite:///{folder / 'chitrakar.db'}"
        assert run_chitrakar("db", "upgrade", env=env, cwd=folder).returncode == 0

    def start(self, command: str, name: str | None = None) -> Any:
        return self._stack.enter_context(
            chitrakar_process(command, env=self.env, log_dir=self.folder, name=name or command)
        )

    def rows(self, model: Any) -> list[Any]:
        store = Store(self.database_url)
        try:
            with store.unit_of_work() as uow:
                rows = list(uow.session.scalars(select(model)))
                uow.session.expunge_all()
                return rows
        finally:
            store.dispose()

    def ledger_of(self, job_id: int) -> list[str]:
        return sorted(e.kind for e in self.rows(LedgerEntry) if e.job_id == job_id)

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)


@pytest.fixture
def deployment(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, redis_server: RedisServer
) -> Iterator[Deployment]:
    env = chitrakar_env(
        emulator,
        tmp_path,
        tiny_model,
        broker_url=redis_server.url,
        # Slow enough (a few seconds a job) to kill a worker in the middle of one.
        image_size="256",
        **FAST_RECOVERY,
    )
    with ExitStack() as stack:
        yield Deployment(env, tmp_path, stack)


def worker_pid(job: Job) -> int:
    assert job.worker is not None
    return int(job.worker.rsplit(":", 1)[1])


def test_a_worker_killed_mid_generation_its_job_completes_on_another_once(
    emulator: BotApiEmulator, deployment: Deployment
) -> None:
    deployment.start("bot")
    workers = {
        p.pid: p
        for p in (deployment.start("worker", "worker-a"), deployment.start("worker", "worker-b"))
    }
    deployment.start("beat")
    emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", 60)
    user = emulator.user(7001)
    chat = emulator.private_chat(user)
    command = emulator.send_text(chat, user, "/portrait a lighthouse in a storm --steps 40")

    # Kill the worker that took the job as soon as it shows progress: no goodbye, no ack.
    emulator.wait_for("editMessageText", lambda c: "%" in c.params.get("text", ""), timeout=90)
    [running] = jobs_in_chat(deployment.database_url, chat["id"])
    victim = worker_pid(running)
    os.killpg(victim, signal.SIGKILL)
    workers[victim].wait(10)

    [done] = wait_for_jobs(deployment.database_url, chat["id"], "done", timeout=120)
    assert done.attempts == 2 and worker_pid(done) != victim
    assert any("handed back" in (e.detail or "") for e in done.events)
    photos = [c for c in emulator.calls_to("sendPhoto", chat["id"]) if replying_to(command)(c)]
    assert len(photos) == 1
    assert deployment.ledger_of(done.id) == ["commit", "reserve"]


def test_a_broker_that_restarts_empty_loses_no_job(
    emulator: BotApiEmulator, deployment: Deployment, redis_server: RedisServer
) -> None:
    deployment.env["CHITRAKAR_REPUBLISH_AFTER"] = "2"
    deployment.start("bot")
    emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", 60)
    user = emulator.user(7002)
    chat = emulator.private_chat(user)
    commands = [
        emulator.send_text(chat, user, f"/portrait a kite number {n} --steps 4") for n in range(2)
    ]
    deployment.wait_until(lambda: redis_server.queued(QUEUE) == 2, 60, "two queued messages")
    redis_server.restart()
    assert redis_server.queued(QUEUE) == 0  # the queue is gone with the broker

    deployment.start("worker")
    deployment.start("beat")
    jobs = wait_for_jobs(deployment.database_url, chat["id"], "done", "done", timeout=120)
    for command in commands:
        photos = [c for c in emulator.calls_to("sendPhoto", chat["id"]) if replying_to(command)(c)]
        assert len(photos) == 1
    for job in jobs:
        assert job.attempts == 1
        assert deployment.ledger_of(job.id) == ["commit", "reserve"]


@pytest.mark.parametrize(
    ("status", "description", "retry_after", "times", "waited"),
    [
        (502, "Bad Gateway", None, 2, 3.0),  # backoff: 1 s, then 2 s
        (429, "Too Many Requests: retry after 2", 2, 1, 2.0),  # as Telegram asks
    ],
    ids=["bad-gateway", "flood-limit"],
)
def test_telegram_errors_delay_the_result_but_never_drop_it(
    emulator: BotApiEmulator,
    deployment: Deployment,
    status: int,
    description: str,
    retry_after: int | None,
    times: int,
    waited: float,
) -> None:
    deployment.start("bot")
    deployment.start("worker")
    emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", 60)
    user = emulator.user(7003)
    chat = emulator.private_chat(user)
    emulator.fail("sendPhoto", status, description, retry_after=retry_after, times=times)
    command = emulator.send_text(chat, user, "/portrait a temple at dusk --steps 4")

    sent = emulator.wait_for("sendPhoto", replying_to(command), timeout=90)
    attempts = emulator.calls_to("sendPhoto", chat["id"])
    assert len(attempts) == times + 1 and not isinstance(attempts[0].result, dict)
    assert sent.at - attempts[0].at >= waited
    [job] = wait_for_jobs(deployment.database_url, chat["id"], "done")
    assert job.attempts == 1 and job.delivered_at is not None
    assert deployment.ledger_of(job.id) == ["commit", "reserve"]


def test_a_worker_told_to_stop_finishes_its_job_first(
    emulator: BotApiEmulator, deployment: Deployment
) -> None:
    deployment.start("bot")
    worker = deployment.start("worker")
    emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", 60)
    user = emulator.user(7004)
    chat = emulator.private_chat(user)
    command = emulator.send_text(chat, user, "/portrait a night train --steps 40")
    emulator.wait_for("editMessageText", lambda c: "%" in c.params.get("text", ""), timeout=90)

    os.killpg(worker.pid, signal.SIGTERM)  # as systemd stops a service
    assert worker.wait(120) == 0
    emulator.wait_for("sendPhoto", replying_to(command), timeout=5)
    [job] = wait_for_jobs(deployment.database_url, chat["id"], "done")
    assert job.attempts == 1
    # It left no heartbeat: nothing will think it still holds a job.
    assert deployment.rows(WorkerHeartbeat) == []
    assert [e.status for e in deployment.rows(JobEvent) if e.job_id == job.id][-1] == "done"


def test_a_workers_health_checks_follow_its_broker(
    deployment: Deployment, redis_server: RedisServer
) -> None:
    port = free_port()
    deployment.env["CHITRAKAR_WORKER_HEALTH_PORT"] = str(port)
    deployment.start("worker")
    base = f"http://127.0.0.1:{port}"

    def status(path: str) -> int:
        try:
            return httpx.get(f"{base}{path}", timeout=10).status_code
        except httpx.TransportError:
            return 0

    deployment.wait_until(lambda: status("/readyz") == 200, 90, "the worker to be ready")
    assert status("/healthz") == 200
    redis_server.stop()
    deployment.wait_until(lambda: status("/readyz") == 503, 30, "the worker to be unready")
    assert status("/healthz") == 200  # alive all the same: nothing to restart it for
    redis_server.start()
    deployment.wait_until(lambda: status("/readyz") == 200, 30, "the worker to be ready again")


def test_database_connections_dropped_mid_job_lose_nothing(
    emulator: BotApiEmulator,
    tmp_path: Path,
    tiny_model: Path,
    redis_server: RedisServer,
    postgres_url: str,
) -> None:
    """PostgreSQL closes every connection of the deployment (an admin's terminate, a failover)
    while a job runs: the pools reconnect, the job completes, once."""
    env = chitrakar_env(
        emulator,
        tmp_path,
        tiny_model,
        database_url=postgres_url,
        broker_url=redis_server.url,
        image_size="256",
        **FAST_RECOVERY,
    )
    with ExitStack() as stack:
        deployment = Deployment(env, tmp_path, stack)
        deployment.database_url = postgres_url
        deployment.start("bot")
        deployment.start("worker")
        emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", 60)
        user = emulator.user(7005)
        chat = emulator.private_chat(user)
        command = emulator.send_text(chat, user, "/portrait a harbour at night --steps 40")
        emulator.wait_for("editMessageText", lambda c: "%" in c.params.get("text", ""), timeout=90)

        database = make_url(postgres_url).database
        admin = create_engine(make_url(postgres_url).set(database="postgres"))
        try:
            with admin.connect() as connection:
                dropped = connection.execute(
                    sql_text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = :database AND pid <> pg_backend_pid()"
                    ),
                    {"database": database},
                ).scalar_one()
        finally:
            admin.dispose()
        assert dropped >= 1

        [job] = wait_for_jobs(postgres_url, chat["id"], "done", timeout=120)
        photos = [c for c in emulator.calls_to("sendPhoto", chat["id"]) if replying_to(command)(c)]
        assert len(photos) == 1
        assert deployment.ledger_of(job.id) == ["commit", "reserve"]
        # And the bot still takes requests.
        again = emulator.send_text(chat, user, "/portrait a second harbour --steps 4")
        emulator.wait_for("sendPhoto", replying_to(again), timeout=90)


def test_a_bot_told_to_stop_finishes_the_request_in_hand(
    emulator: BotApiEmulator, deployment: Deployment
) -> None:
    """SIGTERM while a request is half answered (its status message on the way): the bot
    takes no more updates, finishes that one (the job handed to the queue), and exits."""
    bot = deployment.start("bot")
    emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", 60)
    user = emulator.user(7006)
    chat = emulator.private_chat(user)
    emulator.delay("sendMessage", 3.0)
    command = emulator.send_text(chat, user, "/portrait a lantern festival --steps 4")
    emulator.wait_for("sendMessage", lambda c: c.params.get("chat_id") == chat["id"], 30)

    os.killpg(bot.pid, signal.SIGTERM)
    assert bot.wait(60) == 0
    [job] = jobs_in_chat(deployment.database_url, chat["id"])
    assert job.status == "queued" and job.published_at is not None
    assert job.status_message_id is not None

    emulator.delay("sendMessage", 0.0)
    deployment.start("worker")
    emulator.wait_for("sendPhoto", replying_to(command), timeout=90)
