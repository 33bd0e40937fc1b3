"""`chitrakar run` with CHITRAKAR_BOT_INTAKE_PROCESS: the bot takes commands in through a child
process of its own; users see the same replies, refusals included, and the child stops with
the bot."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from chitrakar.safety import PROMPT_BLOCKED_KEY
from chitrakar.texts import text
from tests.support.botapi import BotApiEmulator
from tests.support.stack import (
    chitrakar_env,
    chitrakar_process,
    process_running,
    wait_for_jobs,
    wait_until_gone,
)

pytestmark = pytest.mark.e2e


def test_a_bot_with_an_intake_process_answers_as_before_and_stops_whole(
    tmp_path: Path, tiny_model: Path
) -> None:
    emulator = BotApiEmulator().start()
    env = chitrakar_env(emulator, tmp_path, tiny_model, bot_intake_process="true")
    database_url = f"sqlite:///{tmp_path / 'chitrakar.db'}"
    log_path = tmp_path / "run.log"
    try:
        with chitrakar_process("run", env=env, log_dir=tmp_path):
            emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", 60)
            [intake_pid] = re.findall(r"intake process (\d+) is up", log_path.read_text())
            assert process_running(int(intake_pid))

            commands = []
            for n in range(4):
                user = emulator.user(3100 + n)
                chat = emulator.private_chat(user)
                commands.append(emulator.send_text(chat, user, f"/portrait a kite {n}"))
            user = emulator.user(3199)
            blocked = emulator.send_text(
                emulator.private_chat(user), user, "/portrait a nude woman on a beach"
            )

            for command in commands:
                chat_id = command["chat"]["id"]
                [job] = wait_for_jobs(database_url, chat_id, "done", timeout=120)
                assert job.prompt == command["text"].removeprefix("/portrait ")
                [queued] = emulator.calls_to("sendMessage", chat_id)
                # Four users at once: each is told their own place among the four.
                places = {text("en", "status.queued", position=n) for n in range(1, 5)}
                assert queued.params["text"] in places
                [photo] = emulator.calls_to("sendPhoto", chat_id)
                assert queued.at < photo.at
            # A refusal raised in the child reaches its user as its own reply.
            refusal = emulator.wait_for(
                "sendMessage", lambda c: c.params["chat_id"] == blocked["chat"]["id"], timeout=30
            )
            assert refusal.params["text"] == text("en", PROMPT_BLOCKED_KEY)
            accepted_by = {
                line.split()[3]
                for line in log_path.read_text().splitlines()
                if " accepted from " in line
            }
            assert accepted_by == {"bot-intake"}

            # The child killed (the OOM killer, say): the next command starts another.
            os.kill(int(intake_pid), signal.SIGKILL)
            ended = f"the intake process {intake_pid} ended (exit code -9) with 0 call(s) in hand"
            deadline = time.monotonic() + 10
            while ended not in log_path.read_text():
                assert time.monotonic() < deadline, "the bot did not see its intake process end"
                time.sleep(0.1)
            user = emulator.user(3200)
            after = emulator.send_text(emulator.private_chat(user), user, "/portrait a kite again")
            [job] = wait_for_jobs(database_url, after["chat"]["id"], "done", timeout=120)
            assert "the intake process stopped; starting another" in log_path.read_text()
            children = re.findall(r"intake process (\d+) up \(bot process", log_path.read_text())
            assert children[0] == intake_pid and len(children) == 2
    finally:
        emulator.stop()
    wait_until_gone(int(children[1]), timeout=10)  # it did not outlive its bot
