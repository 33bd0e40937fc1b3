"""Starting the real `chitrakar` processes for end-to-end tests, and reading their store."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import selectinload

from chitrakar.config import Settings
from db.models import Job
from db.session import Store
from tests.support.botapi import BotApiEmulator

TEST_IMAGE_SIZE = 64
TEST_STEPS = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def chitrakar_env(
    emulator: BotApiEmulator | None,
    data_dir: Path,
    model: Path,
    *,
    database_url: str | None = None,
    broker_url: str | None = None,
    **settings: str,
) -> dict[str, str]:
    """The environment of a test deployment (Telegram through the emulator; without one, the
    web chat alone); `settings` are more CHITRAKAR_ variables, by their names in lower case
    without the prefix. The web server gets a free port of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHITRAKAR_") or "TEST" in k}
    if emulator is not None:
        env.update(
            CHITRAKAR_TELEGRAM_TOKEN=emulator.token,
            CHITRAKAR_TELEGRAM_API_URL=emulator.base_url,
            CHITRAKAR_TELEGRAM_FILE_URL=emulator.base_file_url,
        )
    env.update(
        CHITRAKAR_WEB_PORT=str(free_port()),
        CHITRAKAR_DATA_DIR=str(data_dir),
        CHITRAKAR_MODEL=str(model),
        CHITRAKAR_DEVICE="cpu",
        CHITRAKAR_IMAGE_SIZE=str(TEST_IMAGE_SIZE),
        CHITRAKAR_DEFAULT_STEPS=str(TEST_STEPS),
        CHITRAKAR_PROGRESS_INTERVAL="0",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if database_url:
        env["CHITRAKAR_DATABASE_URL"] = database_url
    if broker_url:
        env["CHITRAKAR_BROKER_URL"] = broker_url
    env.update({f"CHITRAKAR_{name.upper()}": value for name, value in settings.items()})
    return env


def worker_settings(
    emulator: BotApiEmulator, data_dir: Path, model: Path, **overrides: Any
) -> Settings:
    """Settings of a worker run inside the test process, delivering to the emulator."""
    return Settings(
        telegram_token=emulator.token,
        telegram_api_url=emulator.base_url,
        telegram_file_url=emulator.base_file_url,
        data_dir=data_dir,
        model=str(model),
        device="cpu",
        **overrides,
    )


def run_chitrakar(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chitrakar", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextmanager
def chitrakar_process(
    *args: str, env: dict[str, str], log_dir: Path, echo_log: bool = True, name: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `chitrakar ARGS` in a process group of its own until the block ends, then stop it
    as a service manager would (SIGTERM, then SIGKILL). Yields the process; its log's tail
    is printed at the end (pytest shows it when the test fails). `name` names the log (for
    two processes of one command)."""
    command = [sys.executable, "-m", "chitrakar", *args]
    log_path = log_dir / f"{name or '-'.join(args)}.log"
    with process_group(command, env=env, log_path=log_path, echo_log=echo_log) as process:
        yield process


@contextmanager
def process_group(
    command: list[str], *, env: dict[str, str], log_path: Path, echo_log: bool = True
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a command in a process group of its own, logging to `log_path` in the log's
    folder, until the block ends; then stop it (SIGTERM, then SIGKILL)."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=log_path.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
            if echo_log:
                print(f"--- tail of {log_path.name} ---")
                print("".join(log_path.read_text(errors="replace").splitlines(True)[-60:]))


def worker_ready(log_path: Path, timeout: float = 120) -> int:
    """The pid of `chitrakar run`'s worker, once it takes tasks (`log_path`: run's log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = log_path.read_text(errors="replace")
        if " ready." in log:
            [pid] = re.findall(r"worker started \(pid (\d+)\)", log)
            return int(pid)
        time.sleep(0.2)
    raise AssertionError("the worker did not become ready")


def jobs_in_chat(database_url: str, chat_id: int) -> list[Job]:
    """The chat's job rows with their events, detached from any session."""
    store = Store(database_url)
    try:
        with store.unit_of_work() as uow:
            jobs = list(
                uow.session.scalars(
                    select(Job)
                    .where(Job.chat_id == chat_id)
                    .order_by(Job.id)
                    .options(selectinload(Job.events))
                )
            )
            uow.session.expunge_all()
            return jobs
    finally:
        store.dispose()


def wait_for_jobs(
    database_url: str, chat_id: int, *statuses: str, timeout: float = 30.0
) -> list[Job]:
    """The chat's jobs once they are in `statuses` (the worker records the end of a job just
    after it has answered in the chat)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = jobs_in_chat(database_url, chat_id)
        if [job.status for job in jobs] == list(statuses) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.1)


@contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on the server at `server_url` (an admin login), as a
    URL; dropped when the block ends."""
    name = f"chitrakar_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def process_running(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent to reap it (Linux)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process_running(pid):
        assert time.monotonic() < deadline, f"process {pid} still running after {timeout} s"
        time.sleep(0.1)
