"""Soak under faults: N `/portrait` requests to a deployment of separate processes (bot, two
workers, beat; Redis as the broker; SQLite; the tiny model; the Bot API emulator), while a
worker is killed with SIGKILL every few seconds (and replaced), and Redis is restarted empty
once, half-way.

    PYTHONPATH=. .venv/bin/python bench/soak.py [--jobs 40] [--kill-every 30]

Counts, per request: answered once (images or an apology), lost (never answered), duplicated
(answered more than once); and the longest a request waited after a fault for its answer.
Prints one JSON object. Target: 0 lost, 0 duplicated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from itertools import pairwise
from pathlib import Path
from subprocess import Popen
from typing import Any

from sqlalchemy import select

from db.models import Job, LedgerEntry
from db.session import Store
from tests.faults.conftest import RedisServer
from tests.support.botapi import BotApiEmulator, Call
from tests.support.stack import chitrakar_env, chitrakar_process, run_chitrakar
from workers.tiny import make_tiny


def answers(emulator: BotApiEmulator, command: dict[str, Any]) -> list[Call]:
    """The photos (or albums) and apologies that reply to one command."""

    def replies(call: Call) -> bool:
        reply = call.params.get("reply_parameters") or {}
        return reply.get("message_id") == command["message_id"] and isinstance(call.result, dict)

    photos = [
        c
        for c in emulator.calls
        if c.method in ("sendPhoto", "sendMediaGroup")
        and c.params.get("chat_id") == command["chat"]["id"]
        and replies(c)
    ]
    return photos


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--kill-every", type=float, default=30.0)
    parser.add_argument("--republish-after", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    rng = random.Random(7)

    work = Path(tempfile.mkdtemp(prefix="chitrakar-soak-"))
    model = make_tiny(work / "tiny")
    redis = RedisServer(work)
    redis.start()
    emulator = BotApiEmulator().start()
    env = chitrakar_env(
        emulator,
        work,
        model,
        broker_url=redis.url,
        image_size="64",
        heartbeat_interval="1",
        worker_stale_after="5",
        reconcile_interval="2",
        # Longer than a queued job waits here, so that a healthy queue is left alone.
        republish_after=str(args.republish_after),
    )
    assert run_chitrakar("db", "upgrade", env=env, cwd=work).returncode == 0
    database_url = f"sqlite:///{work / 'chitrakar.db'}"
    faults: list[tuple[float, str]] = []

    with ExitStack() as stack:

        @contextmanager
        def process(command: str, name: str) -> Iterator[Popen[bytes]]:
            with chitrakar_process(
                command, env=env, log_dir=work, name=name, echo_log=False
            ) as started:
                yield started

        stack.enter_context(process("bot", "bot"))
        stack.enter_context(process("beat", "beat"))
        workers = [stack.enter_context(process("worker", f"worker-{n}")) for n in range(2)]
        emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", 90)

        users = [emulator.user(9000 + n) for n in range(8)]
        commands = []
        started = time.monotonic()
        for n in range(args.jobs):
            user = users[n % len(users)]
            chat = emulator.private_chat(user)
            commands.append(
                emulator.send_text(chat, user, f"/portrait soak request {n} --steps 20")
            )
        next_kill = time.monotonic() + args.kill_every
        restarted = False
        spawned = 2
        while time.monotonic() - started < args.timeout:
            answered = sum(1 for c in commands if answers(emulator, c))
            store = Store(database_url)
            with store.unit_of_work() as uow:
                ended = [
                    j
                    for j in uow.session.scalars(select(Job))
                    if j.status in ("done", "failed", "cancelled", "blocked")
                ]
            store.dispose()
            if len(ended) >= args.jobs:
                break
            if time.monotonic() >= next_kill:
                victim = rng.choice([w for w in workers if w.poll() is None])
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait(10)
                faults.append((time.monotonic() - started, f"killed worker {victim.pid}"))
                workers.append(stack.enter_context(process("worker", f"worker-{spawned}")))
                spawned += 1
                next_kill = time.monotonic() + args.kill_every
            if not restarted and answered >= args.jobs // 2:
                redis.restart()
                restarted = True
                faults.append((time.monotonic() - started, "restarted Redis empty"))
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        time.sleep(3)  # let any duplicate arrive before counting

        store = Store(database_url)
        with store.unit_of_work() as uow:
            # Plain values: the rows are gone with the session.
            jobs = {
                row.id: row
                for row in uow.session.execute(
                    select(
                        Job.id,
                        Job.status,
                        Job.attempts,
                        Job.chat_id,
                        Job.request_message_id,
                        Job.created_at,
                        Job.finished_at,
                    )
                )
            }
            entries = list(uow.session.execute(select(LedgerEntry.job_id, LedgerEntry.kind)))
        store.dispose()

    redis.stop()
    emulator.stop()
    by_request = {(j.chat_id, j.request_message_id): j for j in jobs.values()}
    photos, lost = [], 0
    for command in commands:
        sent = len(answers(emulator, command))
        job = by_request.get((command["chat"]["id"], command["message_id"]))
        photos.append(sent)
        # Answered: its images, or (failed) an apology with the credits back.
        lost += sent == 0 and (job is None or job.status != "failed")
    apologised = sum(1 for j in jobs.values() if j.status == "failed")
    finished = [j for j in jobs.values() if j.finished_at is not None]
    ends = sorted(j.finished_at for j in finished)
    refunded = {e.job_id for e in entries if e.kind == "refund"}
    committed = {e.job_id for e in entries if e.kind == "commit"}
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "jobs": args.jobs,
        "faults": len(faults),
        "worker_kills": sum(1 for _, what in faults if what.startswith("killed")),
        "broker_restarts": sum(1 for _, what in faults if what.startswith("restarted")),
        "done": sum(1 for j in jobs.values() if j.status == "done"),
        "failed_with_apology_and_refund": apologised,
        "lost": lost,
        "duplicated": sum(1 for n in photos if n > 1),
        "ledger_balanced": all((job_id in committed) != (job_id in refunded) for job_id in jobs),
        "attempts_max": max(j.attempts for j in jobs.values()),
        # Recovery: the longest any request waited for its answer, and the longest time in
        # which no request was answered at all (a fault's outage), in seconds.
        "longest_wait_s": round(
            max((j.finished_at - j.created_at).total_seconds() for j in finished), 1
        ),
        "longest_stall_s": round(
            max((b - a).total_seconds() for a, b in pairwise(ends)) if len(ends) > 1 else 0.0,
            1,
        ),
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
