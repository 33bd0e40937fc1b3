"""Webhook mode: Telegram posts updates to the bot's own HTTP server, which checks the secret
token, refuses what is not an update, and answers health checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.botapi import BotApiEmulator
from tests.support.stack import (
    chitrakar_env,
    chitrakar_process,
    free_port,
    jobs_in_chat,
    run_chitrakar,
    wait_for_jobs,
)

pytestmark = pytest.mark.e2e
SECRET = "s3cret-Token_for-tests"


def call(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


def post_update(url: str, update: Any, secret: str | None = SECRET) -> int:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Telegram-Bot-Api-Secret-Token"] = secret
    body = update if isinstance(update, bytes) else json.dumps(update).encode()
    return call(url, body, headers)


def webhook_env(
    emulator: BotApiEmulator, data_dir: Path, model: Path, **extra: str
) -> tuple[dict[str, str], str, str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = chitrakar_env(emulator, data_dir, model)
    env.update(
        CHITRAKAR_TELEGRAM_WEBHOOK_URL=f"{base}/telegram/hook-7f3a",
        CHITRAKAR_TELEGRAM_WEBHOOK_SECRET=SECRET,
        CHITRAKAR_WEB_PORT=str(port),
        **extra,
    )
    return env, base, f"{base}/telegram/hook-7f3a"


@pytest.fixture(scope="module")
def webhook_stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[tuple[BotApiEmulator, str, str, str]]:
    emulator = BotApiEmulator().start()
    data_dir = tmp_path_factory.mktemp("webhook")
    env, base, hook = webhook_env(emulator, data_dir, tiny_model)
    with chitrakar_process("run", env=env, log_dir=data_dir):
        emulator.wait_for("setWebhook", timeout=60)
        emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi")
        yield emulator, base, hook, f"sqlite:///{data_dir / 'chitrakar.db'}"
    emulator.stop()


def test_the_webhook_is_registered_with_its_secret(
    webhook_stack: tuple[BotApiEmulator, str, str, str],
) -> None:
    emulator, base, hook, _ = webhook_stack
    assert emulator.webhook == {"url": hook, "secret_token": SECRET}
    assert emulator.calls_to("getUpdates") == []
    assert call(f"{base}/healthz") == 200
    assert call(f"{base}/readyz") == 200


def test_a_portrait_through_the_webhook_and_a_retry_of_it(
    webhook_stack: tuple[BotApiEmulator, str, str, str],
) -> None:
    emulator, _, hook, database_url = webhook_stack
    user = emulator.user(1201, "Nila")
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/portrait a lotus pond at noon")
    update = emulator.update_for(command)

    assert post_update(hook, update) == 200
    assert post_update(hook, update) == 200  # Telegram retries when it misses an answer
    photo = emulator.wait_for(
        "sendPhoto",
        lambda c: (
            (c.params.get("reply_parameters") or {}).get("message_id") == command["message_id"]
        ),
        timeout=120,
    )
    assert photo.params["chat_id"] == chat["id"]
    [job] = wait_for_jobs(database_url, chat["id"], "done")
    assert job.prompt == "a lotus pond at noon"


@pytest.mark.parametrize(
    ("secret", "body", "status"),
    [
        (None, "update", 401),
        ("wrong-secret", "update", 403),
        (SECRET[:-1], "update", 403),
        (SECRET, b"{not json", 400),
        (SECRET, b"[1, 2, 3]", 400),
        (SECRET, b"{" + b" " * (2 * 1024 * 1024) + b"}", 413),
    ],
    ids=["missing-secret", "wrong-secret", "secret-prefix", "bad-json", "not-an-object", "huge"],
)
def test_what_is_not_a_genuine_update_is_refused(
    webhook_stack: tuple[BotApiEmulator, str, str, str],
    secret: str | None,
    body: Any,
    status: int,
) -> None:
    emulator, _, hook, database_url = webhook_stack
    user = emulator.user(1300 + status + len(str(secret)))
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/portrait a forged request")
    update = emulator.update_for(command) if body == "update" else body

    assert post_update(hook, update, secret=secret) == status
    # A genuine update afterwards is answered, so the refused one had its chance to act.
    marker = emulator.history_message(chat, user, "/help")
    assert post_update(hook, emulator.update_for(marker)) == 200
    emulator.wait_for("sendMessage", lambda c: c.params["chat_id"] == chat["id"])
    assert jobs_in_chat(database_url, chat["id"]) == []


def raw_post(base: str, path: str, head: bytes, body: bytes, pieces: int = 1) -> int:
    """POST over a plain socket: the body in `pieces` sends, as a proxy may forward it."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            + head
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
        )
        size = -(-len(body) // pieces)
        for start in range(0, len(body), size):
            connection.sendall(body[start : start + size])
            time.sleep(0.2)
        answer = connection.recv(1024)
    return int(answer.split()[1])


def test_an_update_arriving_in_pieces_is_read_whole(
    webhook_stack: tuple[BotApiEmulator, str, str, str],
) -> None:
    emulator, base, hook, database_url = webhook_stack
    user = emulator.user(1401)
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/portrait monsoon clouds over Munnar")
    body = json.dumps(emulator.update_for(command)).encode()
    secret = b"X-Telegram-Bot-Api-Secret-Token: " + SECRET.encode() + b"\r\n"
    path = hook.removeprefix(base)

    assert raw_post(base, path, secret, body, pieces=3) == 200
    [job] = wait_for_jobs(database_url, chat["id"], "done", timeout=120)
    assert job.prompt == "monsoon clouds over Munnar"


def test_a_secret_header_that_is_not_text_is_refused(
    webhook_stack: tuple[BotApiEmulator, str, str, str],
) -> None:
    emulator, base, hook, _ = webhook_stack
    user = emulator.user(1402)
    body = json.dumps(
        emulator.update_for(
            emulator.history_message(emulator.private_chat(user), user, "/portrait x")
        )
    ).encode()
    head = b"X-Telegram-Bot-Api-Secret-Token: \xff\xfe-not-utf8\r\n"
    assert raw_post(base, hook.removeprefix(base), head, body) == 403


def test_not_ready_while_the_broker_is_unreachable(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    env, base, _ = webhook_env(
        emulator, tmp_path, tiny_model, CHITRAKAR_BROKER_URL="redis://127.0.0.1:9/0"
    )
    assert run_chitrakar("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    with chitrakar_process("bot", env=env, log_dir=tmp_path):
        emulator.wait_for("setWebhook", timeout=60)
        assert call(f"{base}/healthz") == 200
        assert call(f"{base}/readyz") == 503


def test_a_port_in_use_is_a_clear_error(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    env, _, _ = webhook_env(emulator, tmp_path, tiny_model)
    assert run_chitrakar("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["CHITRAKAR_WEB_PORT"])))
        taken.listen()
        result = run_chitrakar("bot", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "The web server cannot listen on 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_webhook_without_a_secret_is_refused_at_start(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    env, _, _ = webhook_env(emulator, tmp_path, tiny_model)
    del env["CHITRAKAR_TELEGRAM_WEBHOOK_SECRET"]
    result = run_chitrakar("bot", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "CHITRAKAR_TELEGRAM_WEBHOOK_SECRET is not" in result.stderr
    assert emulator.calls == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
update_fields = st.sampled_from(
    [
        "message",
        "edited_message",
        "callback_query",
        "inline_query",
        "poll",
        "my_chat_member",
        "chat_join_request",
        "message_reaction",
        "business_message",
        "purchased_paid_media",
        "zzz",
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.one_of(
        st.dictionaries(update_fields, json_values, max_size=3).map(
            lambda d: json.dumps({"update_id": 990000, **d}).encode()
        ),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
    )
)
def test_any_body_with_the_secret_is_answered_without_a_crash(
    webhook_stack: tuple[BotApiEmulator, str, str, str], body: bytes
) -> None:
    """Malformed JSON, unknown update types, updates of the wrong shape: 200 (taken, and
    ignored by the handlers) or 400 (not an update), never a server error."""
    _, base, hook, _ = webhook_stack
    assert post_update(hook, body) in (200, 400)
    assert call(f"{base}/healthz") == 200


def test_two_bot_processes_share_the_webhooks_port(tmp_path: Path, tiny_model: Path) -> None:
    """CHITRAKAR_BOT_PROCESSES=2: the second process listens on the same port, both take
    webhook posts (the kernel spreads connections), every command is answered once, and only
    the first registers the webhook and the command menu."""
    emulator = BotApiEmulator().start()
    env, base, hook = webhook_env(emulator, tmp_path, tiny_model, CHITRAKAR_BOT_PROCESSES="2")
    database_url = f"sqlite:///{tmp_path / 'chitrakar.db'}"
    log_path = tmp_path / "run.log"
    try:
        with chitrakar_process("run", env=env, log_dir=tmp_path):
            emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi")
            deadline = time.monotonic() + 60
            while " bot-1 bot.server: " not in log_path.read_text():
                assert time.monotonic() < deadline, "the second bot process did not start"
                time.sleep(0.2)
            commands = []
            for n in range(16):
                user = emulator.user(2400 + n)
                chat = emulator.private_chat(user)
                commands.append(emulator.history_message(chat, user, f"/portrait kite {n}"))
            # Each post on a connection of its own, several at once, as Telegram sends them.
            with ThreadPoolExecutor(8) as pool:
                answers = list(
                    pool.map(lambda m: post_update(hook, emulator.update_for(m)), commands)
                )
            assert answers == [200] * len(commands)
            for command in commands:
                chat_id = command["chat"]["id"]
                [job] = wait_for_jobs(database_url, chat_id, "done", timeout=120)
                assert job.prompt == command["text"].removeprefix("/portrait ")
                queued = [
                    c
                    for c in emulator.calls_to("sendMessage")
                    if c.params["chat_id"] == chat_id and c.params["text"].startswith("Queued")
                ]
                assert len(queued) == 1
            accepted_by = {
                line.split()[3]
                for line in log_path.read_text().splitlines()
                if " accepted from " in line
            }
            assert accepted_by == {"MainProcess", "bot-1"}
            assert call(f"{base}/readyz") == 200
    finally:
        emulator.stop()
    assert len(emulator.calls_to("setWebhook")) == 1
    assert len(emulator.calls_to("setMyCommands")) == 2  # English and Hindi, once


def test_two_bot_processes_need_the_webhook(tmp_path: Path, tiny_model: Path) -> None:
    emulator = BotApiEmulator().start()
    try:
        env = chitrakar_env(emulator, tmp_path, tiny_model, bot_processes="2")
        result = run_chitrakar("bot", env=env, cwd=tmp_path)
    finally:
        emulator.stop()
    assert result.returncode != 0
    assert "CHITRAKAR_BOT_PROCESSES=2 needs the webhook" in result.stderr
    assert emulator.calls_to("getUpdates") == []


def test_when_one_bot_process_dies_the_bot_stops_to_be_restarted(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A second bot process killed (OOM killer, say): the first stops too, with a failure,
    so that the service manager restarts the bot whole rather than serve on half the port."""
    emulator = BotApiEmulator().start()
    env, _, _ = webhook_env(emulator, tmp_path, tiny_model, CHITRAKAR_BOT_PROCESSES="2")
    log_path = tmp_path / "run.log"
    try:
        with chitrakar_process("run", env=env, log_dir=tmp_path) as first:
            deadline = time.monotonic() + 60
            while " bot-1 bot.server: " not in log_path.read_text():
                assert time.monotonic() < deadline, "the second bot process did not start"
                time.sleep(0.2)
            [second] = [
                int(stat.parent.name)
                for stat in Path("/proc").glob("[0-9]*/stat")
                if stat.exists()
                and stat.read_text().rsplit(")", 1)[1].split()[1] == str(first.pid)
                and b"bot" in (stat.parent / "cmdline").read_bytes().split(b"\0")
            ]
            os.kill(second, signal.SIGKILL)
            assert first.wait(timeout=60) == 1
    finally:
        emulator.stop()
    assert "the bot process 1 stopped (exit code -9); stopping the bot" in log_path.read_text()
