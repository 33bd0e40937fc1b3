"""Telegram: the user's /cancel while a job runs. The bot cancels the job and edits its
status message to "Cancelled."; the worker looks for a cancellation only once a second, and
goes on making progress edits until it does. None of them may leave "Cancelled." overwritten:
none is sent once the job is cancelled, and one sent just before, that reached Telegram after
the bot's edit, has "Cancelled." put back over it when the worker stops.

The user cancels between two denoising steps (a hook on the model's UNet: the step after it
then finds the job cancelled). The real worker service, tiny model, store (SQLite and
PostgreSQL) and Bot API emulator."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chitrakar.domain import GenerationPlan, JobKind, JobStatus
from chitrakar.texts import text
from db import jobs
from db.jobs import Origin
from db.migrate import upgrade_to_head
from tests.support.botapi import BotApiEmulator
from tests.support.stack import worker_settings
from workers.runtime import WorkerRuntime
from workers.service import run_job

USER_ID = 951
CANCELLED = text("en", "cancel.status")


@pytest.fixture
def runtime(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, database_url: str
) -> Iterator[WorkerRuntime]:
    # An edit at every step: as many as can go out before the worker notices the cancel.
    settings = worker_settings(
        emulator, tmp_path, tiny_model, database_url=database_url, progress_interval=0
    )
    upgrade_to_head(settings.resolved_database_url)
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    try:
        yield runtime
    finally:
        runtime.close()


def _job(emulator: BotApiEmulator, runtime: WorkerRuntime) -> tuple[int, dict[str, Any]]:
    """A handed-over job of Mohan's in a group, with its status message recorded."""
    group = emulator.group_chat(-951)
    user = emulator.user(USER_ID, "Mohan")
    command = emulator.history_message(group, user, "/portrait a beach")
    status = emulator.history_message(group, None, text("en", "status.queued", position=1))
    origin = Origin(
        "telegram", group["id"], "group", str(USER_ID), "Mohan", "en", command["message_id"]
    )
    plan = GenerationPlan("a beach", 64, 64, 30, (5,), 7.0)
    with runtime.store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, origin, JobKind.PORTRAIT, plan).job_id
    with runtime.store.unit_of_work() as uow:
        assert jobs.claim_hand_over(uow, job_id, limit=2)
    with runtime.store.unit_of_work() as uow:
        assert jobs.attach_status_message(uow, job_id, status["message_id"])
    return job_id, status


def _bot_edits(emulator: BotApiEmulator, message: dict[str, Any], words: str) -> None:
    """An edit of the status message as the bot (or a late edit of the worker's) makes it."""
    body = {"chat_id": message["chat"]["id"], "message_id": message["message_id"], "text": words}
    request = urllib.request.Request(
        f"{emulator.base_url}{emulator.token}/editMessageText",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10).read()


def _edits_landed(emulator: BotApiEmulator, chat_id: int) -> None:
    """Waits until no edit has come in for a while: the worker's edit on its way, if any, has
    reached the emulator (the worker itself waits in the UNet hook meanwhile)."""
    count, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since <= 0.5:
        now = len(emulator.calls_to("editMessageText", chat_id))
        if now != count:
            count, quiet_since = now, time.monotonic()
        time.sleep(0.05)


def _run_cancelled(
    runtime: WorkerRuntime, job_id: int, step: int, cancel: Callable[[], None]
) -> None:
    """Run the job (30 steps); `cancel` runs before the step-th call of the UNet (one per
    step: the prompt and the empty prompt go in one batch), in the worker's thread."""
    calls = 0

    def before_step(_module: Any, _args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == step:
            cancel()

    unet = runtime.pipeline.text2image.unet
    handle = unet.register_forward_pre_hook(before_step)
    try:
        run_job(runtime, job_id)
    finally:
        handle.remove()
    assert calls >= step
    with runtime.store.unit_of_work() as uow:
        view = jobs.get_job(uow, job_id)
    assert view is not None and view.status == JobStatus.CANCELLED


def _user_cancels(emulator: BotApiEmulator, runtime: WorkerRuntime, status: dict[str, Any]) -> None:
    """/cancel, as the bot handles it: the job cancelled, then its status message edited."""
    with runtime.store.unit_of_work() as uow:
        assert jobs.cancel_jobs(uow, "telegram", status["chat"]["id"], str(USER_ID))
    _bot_edits(emulator, status, CANCELLED)


def _shown(emulator: BotApiEmulator, status: dict[str, Any]) -> str:
    text_now: str = emulator.messages[(status["chat"]["id"], status["message_id"])]["text"]
    return text_now


def test_no_progress_edit_is_sent_after_the_cancel(
    emulator: BotApiEmulator, runtime: WorkerRuntime
) -> None:
    """The user cancels at step 2, just after the worker's first look (at step 1): it looks
    again a second later, or at the end."""
    job_id, status = _job(emulator, runtime)
    _run_cancelled(runtime, job_id, 2, lambda: _user_cancels(emulator, runtime, status))
    edits = [c.params["text"] for c in emulator.calls_to("editMessageText", status["chat"]["id"])]
    after = edits[edits.index(CANCELLED) :]
    # At most the edit already on its way when the user cancelled.
    assert len([edit for edit in after if edit != CANCELLED]) <= 1, edits
    assert _shown(emulator, status) == CANCELLED, edits


def test_a_progress_edit_that_lands_after_the_cancel_is_undone(
    emulator: BotApiEmulator, runtime: WorkerRuntime
) -> None:
    """The worker's last progress edit before the cancel reaches Telegram after the bot's
    "Cancelled." (replayed here after it, as it arrives late)."""
    job_id, status = _job(emulator, runtime)
    chat_id = status["chat"]["id"]

    def cancel() -> None:
        _edits_landed(emulator, chat_id)
        last = emulator.calls_to("editMessageText", chat_id)[-1].params["text"]
        assert last != CANCELLED
        _user_cancels(emulator, runtime, status)
        _bot_edits(emulator, status, last)

    _run_cancelled(runtime, job_id, 4, cancel)
    assert _shown(emulator, status) == CANCELLED
