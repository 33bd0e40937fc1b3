"""The bot's start with Telegram: a token the Bot API refuses stops it with one clear line;
a Bot API that does not answer yet is tried again while the web chat serves."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from tests.support.botapi import BotApiEmulator
from tests.support.stack import chitrakar_env, chitrakar_process, run_chitrakar

WRONG_TOKEN = "999999:WRONG-TOKEN"


def test_a_refused_token_stops_the_bot_with_one_clear_line(
    emulator: BotApiEmulator, tmp_path: Path
) -> None:
    # The bot never loads the model: a path is enough.
    env = chitrakar_env(emulator, tmp_path, tmp_path / "model")
    env["CHITRAKAR_TELEGRAM_TOKEN"] = WRONG_TOKEN
    assert run_chitrakar("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    result = run_chitrakar("bot", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert WRONG_TOKEN not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        f"The Bot API ({emulator.base_url}) refused CHITRAKAR_TELEGRAM_TOKEN: set the token "
        "@BotFather gave you, or unset it to serve the web chat alone."
    )


def _wait_for_line(log: Path, text: str, count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in the log"
        time.sleep(0.1)


def test_a_bot_api_not_answering_at_start_is_tried_again_while_the_web_chat_serves(
    emulator: BotApiEmulator, tmp_path: Path
) -> None:
    env = chitrakar_env(emulator, tmp_path, tmp_path / "model")
    assert run_chitrakar("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    emulator.fail("getMe", status=502, description="Bad Gateway", times=2)
    log = tmp_path / "bot.log"
    with chitrakar_process("bot", env=env, log_dir=tmp_path) as bot:
        _wait_for_line(log, "did not answer (NetworkError: Bad Gateway); trying again in 1 s")
        health = httpx.get(f"http://127.0.0.1:{env['CHITRAKAR_WEB_PORT']}/healthz", timeout=10)
        assert health.status_code == 200
        _wait_for_line(log, "did not answer (NetworkError: Bad Gateway); trying again in 2 s")
        # Then it answers: the bot connects as at any start.
        emulator.wait_for("setMyCommands", timeout=60)
        bot.send_signal(signal.SIGTERM)
        assert bot.wait(30) == 0
    output = log.read_text(errors="replace")
    assert "Traceback" not in output
    assert emulator.token not in output


def test_a_bot_stopped_while_it_waits_for_the_bot_api_stops_cleanly(
    emulator: BotApiEmulator, tmp_path: Path
) -> None:
    env = chitrakar_env(emulator, tmp_path, tmp_path / "model")
    assert run_chitrakar("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    emulator.fail("getMe", status=502, description="Bad Gateway", times=100)
    log = tmp_path / "bot.log"
    with chitrakar_process("bot", env=env, log_dir=tmp_path) as bot:
        _wait_for_line(log, "trying again in 1 s")
        bot.send_signal(signal.SIGTERM)
        assert bot.wait(30) == 0
    output = log.read_text(errors="replace")
    assert "Traceback" not in output
    assert "stopping: Telegram never answered" in output
