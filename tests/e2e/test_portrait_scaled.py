"""The scaled-out shape: Redis as the broker, PostgreSQL as the store, `chitrakar bot` and
`chitrakar worker` as separate processes after `chitrakar db upgrade`."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from tests.support.botapi import BotApiEmulator
from tests.support.stack import (
    TEST_IMAGE_SIZE,
    chitrakar_env,
    chitrakar_process,
    run_chitrakar,
    wait_for_jobs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]


def test_bot_and_worker_refuse_an_unmigrated_database(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, postgres_url: str
) -> None:
    env = chitrakar_env(emulator, tmp_path, tiny_model, database_url=postgres_url)
    for part in ("bot", "worker"):
        result = run_chitrakar(part, env=env, cwd=tmp_path)
        assert result.returncode != 0
        assert "run `chitrakar db upgrade` first" in result.stderr
    assert emulator.calls == []


def test_portrait_with_redis_and_postgresql(
    emulator: BotApiEmulator,
    tmp_path: Path,
    tiny_model: Path,
    postgres_url: str,
    redis_url: str,
) -> None:
    env = chitrakar_env(
        emulator, tmp_path, tiny_model, database_url=postgres_url, broker_url=redis_url
    )
    upgraded = run_chitrakar("db", "upgrade", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr

    with (
        chitrakar_process("worker", env=env, log_dir=tmp_path),
        chitrakar_process("bot", env=env, log_dir=tmp_path),
    ):
        emulator.wait_for("setMyCommands", timeout=60)
        user = emulator.user(701, "Kavya")
        group = emulator.group_chat(-100701)
        commands = [
            emulator.send_text(group, user, f"/portrait@{emulator.username} monsoon in Mumbai"),
            emulator.send_text(group, user, f"/portrait@{emulator.username} Holi colours --n 2"),
        ]
        photo = emulator.wait_for(
            "sendPhoto",
            lambda c: c.params["reply_parameters"]["message_id"] == commands[0]["message_id"],
            timeout=120,
        )
        album = emulator.wait_for(
            "sendMediaGroup",
            lambda c: c.params["reply_parameters"]["message_id"] == commands[1]["message_id"],
            timeout=120,
        )
        jobs = wait_for_jobs(postgres_url, group["id"], "done", "done")

    assert Image.open(io.BytesIO(photo.files["photo"])).size == (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    assert len(album.files) == 2
    assert [job.status for job in jobs] == ["done", "done"]
    # The bot takes updates concurrently, so either may have been accepted first.
    assert sorted(job.prompt for job in jobs) == ["Holi colours", "monsoon in Mumbai"]
    assert all(job.worker and job.generation_seconds for job in jobs)
    # The job accepted second named its place behind the first (unless the first had ended).
    statuses = [
        c.params["text"]
        for c in emulator.calls_to("sendMessage", group["id"])
        if c.params["text"].startswith("Queued.")
    ]
    positions = sorted(int(s.removeprefix("Queued. Your place in line: ")[:-1]) for s in statuses)
    assert positions in ([1, 2], [1, 1])
