"""What the Bot API does to a result on its way: flood limits (429) waited out however often
they come, progress edits kept off a flooded chat, a sent result never undone by what follows
it, a proxy's HTML error page retried, a group that became a supergroup followed. The real
worker service, tiny model, store and Bot API emulator; the deadlines shrunk to seconds."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select
from telegram import Bot
from telegram.error import NetworkError

from chitrakar.bot_api_http import AiohttpRequest
from chitrakar.domain import GenerationPlan, JobKind
from chitrakar.quota import Account
from chitrakar.styles import load_catalogue
from chitrakar.texts import text
from db import jobs
from db.jobs import Origin
from db.migrate import upgrade_to_head
from db.models import Job, LedgerEntry, ResultMessage
from db.session import Store
from tests.support.botapi import BotApiEmulator, Call, Fault
from tests.support.stack import worker_settings
from workers import delivery
from workers.runtime import WorkerRuntime
from workers.service import run_job

# A plan the tiny model makes in about a second; 60 pixels, not a multiple of 8, one that
# diffusers refuses at once (the job fails and is apologised for).
MADE = GenerationPlan("a lighthouse", 64, 64, 3, (5,), 7.0)
ALBUM = GenerationPlan("a lighthouse", 64, 64, 3, (5, 6), 7.0)
REFUSED = GenerationPlan("a lighthouse", 60, 60, 2, (1,), 7.0)


@pytest.fixture
def runtime(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[WorkerRuntime]:
    # As `chitrakar` sets it: python-telegram-bot's durations as timedeltas, without warnings.
    monkeypatch.setenv("PTB_TIMEDELTA", "true")
    # Every progress step is edited: a flooded chat's edits are then plain to see.
    settings = worker_settings(emulator, tmp_path, tiny_model, progress_interval=0.0)
    upgrade_to_head(settings.resolved_database_url)
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    try:
        yield runtime
    finally:
        runtime.close()


@dataclass
class Request:
    job_id: int
    chat_id: int
    command: dict[str, Any]
    status: dict[str, Any]


def request(
    emulator: BotApiEmulator,
    runtime: WorkerRuntime,
    plan: GenerationPlan,
    chat: dict[str, Any] | None = None,
) -> Request:
    """A /portrait handed to the worker, its credits reserved and its status message recorded,
    as the bot leaves it; in the user's private chat unless `chat` is given."""
    user = emulator.user(901, "Kavya")
    chat = chat or emulator.private_chat(user)
    command = emulator.history_message(chat, user, f"/portrait {plan.prompt}")
    status = emulator.history_message(chat, None, text("en", "status.queued", position=1))
    origin = Origin(
        "telegram", chat["id"], chat["type"], "901", "Kavya", "en", command["message_id"]
    )
    with runtime.store.unit_of_work() as uow:
        charge = jobs.Charge((Account("user:telegram:901", 20),), 2, date.today())
        job_id = jobs.take_in(uow, origin, JobKind.PORTRAIT, plan, charge=charge).job_id
    with runtime.store.unit_of_work() as uow:
        assert jobs.claim_hand_over(uow, job_id, limit=2)
        assert jobs.attach_status_message(uow, job_id, status["message_id"])
    return Request(job_id, chat["id"], command, status)


def outcome(runtime: WorkerRuntime, job_id: int) -> tuple[str, list[str], list[tuple[int, int]]]:
    """The job's status, its ledger's entries, and the (chat, message) its result is known by."""
    with runtime.store.unit_of_work() as uow:
        job = uow.session.get(Job, job_id)
        assert job is not None
        ledger = uow.session.scalars(select(LedgerEntry.kind).where(LedgerEntry.job_id == job_id))
        messages = uow.session.execute(
            select(ResultMessage.chat_id, ResultMessage.message_id)
            .where(ResultMessage.job_id == job_id)
            .order_by(ResultMessage.message_id)
        )
        return job.status, sorted(ledger), [(chat, message) for chat, message in messages]


def sent(call: Call) -> bool:
    return isinstance(call.result, (dict, list))


def test_a_result_waits_out_every_flood_limit_however_often_it_comes(
    emulator: BotApiEmulator, runtime: WorkerRuntime
) -> None:
    job = request(emulator, runtime, MADE)
    emulator.fail("sendPhoto", 429, "Too Many Requests: retry after 1", retry_after=1, times=3)

    run_job(runtime, job.job_id)

    tries = emulator.calls_to("sendPhoto", job.chat_id)
    assert [sent(c) for c in tries] == [False, False, False, True]
    # Each try waited the full second Telegram asked for.
    assert all(later.at - earlier.at >= 1.0 for earlier, later in pairwise(tries))
    status, ledger, messages = outcome(runtime, job.job_id)
    assert (status, ledger) == ("done", ["commit", "reserve"])
    assert messages == [(job.chat_id, tries[-1].result["message_id"])]


def test_a_flooded_chat_gets_no_edits_nor_result_until_its_wait_is_over(
    emulator: BotApiEmulator, runtime: WorkerRuntime
) -> None:
    job = request(emulator, runtime, MADE)
    # The first edit (the job started) meets the flood limit.
    emulator.fail("editMessageText", 429, "Too Many Requests: retry after 2", retry_after=2)

    run_job(runtime, job.job_id)

    calls = [c for c in emulator.calls if c.params.get("chat_id") == job.chat_id]
    [flooded] = [c for c in calls if isinstance(c.result, Fault)]
    after = calls[calls.index(flooded) + 1 :]
    # The progress edits meanwhile were skipped, not queued; the photo waited.
    assert after and all(c.at - flooded.at >= 2.0 for c in after), [
        (c.method, round(c.at - flooded.at, 2)) for c in after
    ]
    assert "sendPhoto" in [c.method for c in after]
    assert outcome(runtime, job.job_id)[0] == "done"


def test_the_final_notice_waits_out_a_flood_limit_rather_than_becoming_a_new_message(
    emulator: BotApiEmulator, runtime: WorkerRuntime
) -> None:
    job = request(emulator, runtime, REFUSED)
    # The edit that says the job started, then the apology's first try, meet the limit.
    emulator.fail(
        "editMessageText", 429, "Too Many Requests: retry after 1", retry_after=1, times=2
    )

    run_job(runtime, job.job_id)

    apology = text("en", "error.generation_failed", job_id=job.job_id)
    assert emulator.messages[(job.chat_id, job.status["message_id"])]["text"] == apology
    assert emulator.calls_to("sendMessage", job.chat_id) == []
    assert outcome(runtime, job.job_id)[:2] == ("failed", ["refund", "reserve"])


def test_a_send_started_before_the_deadline_is_not_cut_off_by_it(
    emulator: BotApiEmulator, runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last wait on a flood limit ends just before the deadline: the send after it gets
    the time of an upload, rather than being cancelled midway (the job failed and refunded
    while Telegram may have the photo)."""
    monkeypatch.setattr(delivery, "DELIVERY_DEADLINE_S", 3.0)
    job = request(emulator, runtime, MADE)
    # Refused at once, then a wait that ends a second before the deadline; the photo's own
    # answer comes two seconds after it is sent.
    emulator.fail("sendPhoto", 429, "Too Many Requests", retry_after=2, chat_id=job.chat_id)
    emulator.delay("sendPhoto", 2.0)

    run_job(runtime, job.job_id)

    assert [sent(c) for c in emulator.calls_to("sendPhoto", job.chat_id)] == [False, True]
    assert outcome(runtime, job.job_id)[:2] == ("done", ["commit", "reserve"])


@pytest.mark.parametrize(
    "slow_follow_up",
    ["album-buttons-flooded", "status-removal-slow"],
)
def test_a_sent_result_is_delivered_though_what_follows_it_overruns_the_deadline(
    emulator: BotApiEmulator,
    runtime: WorkerRuntime,
    monkeypatch: pytest.MonkeyPatch,
    slow_follow_up: str,
) -> None:
    monkeypatch.setattr(delivery, "DELIVERY_DEADLINE_S", 3.0)
    monkeypatch.setattr(delivery, "FOLLOW_UP_DEADLINE_S", 1.0)
    if slow_follow_up == "album-buttons-flooded":
        job = request(emulator, runtime, ALBUM)
        # The album's buttons message: Telegram asks for a wait past every deadline.
        emulator.fail("sendMessage", 429, "Too Many Requests", retry_after=5, chat_id=job.chat_id)
        method = "sendMediaGroup"
    else:
        job = request(emulator, runtime, MADE)
        emulator.delay("deleteMessage", 5.0)
        method = "sendPhoto"

    run_job(runtime, job.job_id)

    [result] = emulator.calls_to(method, job.chat_id)
    ids = [m["message_id"] for m in result.result] if method == "sendMediaGroup" else None
    status, ledger, messages = outcome(runtime, job.job_id)
    assert (status, ledger) == ("done", ["commit", "reserve"])
    assert [m for _chat, m in messages] == (ids or [result.result["message_id"]])
    apology = text("en", "error.generation_failed", job_id=job.job_id)
    assert all(c.params.get("text") != apology for c in emulator.calls)


async def test_a_proxys_error_page_is_a_network_error(
    emulator: BotApiEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    chat = emulator.private_chat(emulator.user(902))
    emulator.fail("sendMessage", 502, "Bad Gateway", html=True)
    bot = Bot(
        emulator.token,
        base_url=emulator.base_url,
        request=AiohttpRequest(),
        get_updates_request=AiohttpRequest(connection_pool_size=1),
    )
    async with bot:
        with pytest.raises(NetworkError, match="502"), caplog.at_level(logging.ERROR):
            await bot.send_message(chat["id"], "hello")
    # Not python-telegram-bot's "Can not load invalid JSON data" with a traceback.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("plan", [MADE, REFUSED], ids=["result", "apology"])
def test_a_group_that_became_a_supergroup_gets_its_answer_there(
    emulator: BotApiEmulator, runtime: WorkerRuntime, plan: GenerationPlan
) -> None:
    group = {"id": -4_001, "type": "group", "title": "Chai group"}
    job = request(emulator, runtime, plan, chat=group)
    emulator.migrate(-4_001, -1_000_000_004_001)

    run_job(runtime, job.job_id)

    if plan is MADE:
        [answer] = [c for c in emulator.calls_to("sendPhoto") if sent(c)]
        expected = ("done", ["commit", "reserve"])
    else:
        [answer] = [c for c in emulator.calls_to("sendMessage") if sent(c)]
        assert answer.params["text"] == text("en", "error.generation_failed", job_id=job.job_id)
        expected = ("failed", ["refund", "reserve"])
    # Message ids do not carry over to the supergroup: the answer replies to nothing.
    assert answer.params["chat_id"] == -1_000_000_004_001
    assert "reply_parameters" not in answer.params
    status, ledger, messages = outcome(runtime, job.job_id)
    assert (status, ledger) == expected
    if plan is MADE:
        # The job moved with its result: its buttons and /report work in the supergroup.
        assert messages == [(-1_000_000_004_001, answer.result["message_id"])]
        with runtime.store.unit_of_work() as uow:
            assert jobs.get_job(uow, job.job_id).chat_id == -1_000_000_004_001


def test_a_sent_album_is_recorded_delivered_before_its_buttons_go(
    emulator: BotApiEmulator, runtime: WorkerRuntime
) -> None:
    """A worker that dies while the album's buttons wait on the Bot API must not send the
    album again: its delivery is recorded first."""
    job = request(emulator, runtime, ALBUM)
    emulator.delay("sendMessage", 3.0)
    task = threading.Thread(target=run_job, args=(runtime, job.job_id))
    task.start()
    try:
        emulator.wait_for("sendMessage", lambda c: c.params["chat_id"] == job.chat_id, 60)
        with runtime.store.unit_of_work() as uow:
            assert jobs.get_job(uow, job.job_id).delivered
    finally:
        task.join(60)
    assert outcome(runtime, job.job_id)[:2] == ("done", ["commit", "reserve"])


def test_a_refused_token_is_not_written_to_the_workers_log(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """python-telegram-bot names the token in its refusal: the worker's warning leaves it out
    (logs travel further than the secret should)."""
    wrong = "123456:a-token-the-bot-api-does-not-know"
    settings = worker_settings(emulator, tmp_path, tiny_model).model_copy(
        update={"telegram_token": SecretStr(wrong)}
    )
    with caplog.at_level(logging.WARNING, logger="workers.delivery"):
        store = Store(settings.resolved_database_url)
        delivery.TelegramDelivery(settings, load_catalogue(), store).close()
        store.dispose()
    [warning] = [r.getMessage() for r in caplog.records if "getMe" in r.getMessage()]
    assert "InvalidToken" in warning and "(token)" in warning
    assert wrong not in caplog.text
