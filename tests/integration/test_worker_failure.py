"""A job whose generation fails inside the pipeline: recorded as failed, and the user gets an
apology on their status message. The real worker service, model and Bot API calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from chitrakar.domain import GenerationPlan, JobKind
from chitrakar.texts import text
from db import jobs
from db.jobs import Origin
from db.migrate import upgrade_to_head
from tests.support.botapi import BotApiEmulator
from tests.support.stack import jobs_in_chat, worker_settings
from workers.runtime import WorkerRuntime
from workers.service import run_job


@pytest.mark.parametrize(
    ("status_deleted", "database_blinks"),
    [(False, False), (True, False), (False, True)],
    ids=["on-status", "status-deleted", "database-blinks"],
)
def test_a_pipeline_error_is_recorded_and_apologised_for(
    emulator: BotApiEmulator,
    tmp_path: Path,
    tiny_model: Path,
    status_deleted: bool,
    database_blinks: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = worker_settings(
        emulator,
        tmp_path,
        tiny_model,
    )
    upgrade_to_head(settings.resolved_database_url)
    user = emulator.user(801, "Anil")
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/portrait a lighthouse")
    status = emulator.history_message(chat, None, "Queued.")
    # 60 pixels is not a multiple of 8: diffusers refuses it, as it would a corrupt plan.
    plan = GenerationPlan("a lighthouse", 60, 60, 2, (1,), 7.0)
    origin = Origin("telegram", chat["id"], "private", "801", "Anil", "en", command["message_id"])
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    with runtime.store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, origin, JobKind.PORTRAIT, plan).job_id
        jobs.attach_status_message(uow, job_id, status["message_id"])

    if status_deleted:
        emulator.delete_by_user(chat["id"], status["message_id"])
    if database_blinks:
        # The failure's record meets a database away for a moment: written on a retry, not
        # left running with no one to end it.
        real, calls = jobs.fail_job, []

        def away_once(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            if len(calls) == 1:
                raise OperationalError("UPDATE jobs", {}, Exception("the connection was lost"))
            return real(*args, **kwargs)

        monkeypatch.setattr(jobs, "fail_job", away_once)
    try:
        run_job(runtime, job_id)
    finally:
        runtime.close()

    [job] = jobs_in_chat(settings.resolved_database_url, chat["id"])
    assert job.status == "failed"
    assert job.error is not None and "divisible by 8" in job.error
    assert job.attempts == 1
    apology = text("en", "error.generation_failed", job_id=job_id)
    if status_deleted:
        # The status message is gone, so the apology comes as a reply to the command.
        [reply] = emulator.calls_to("sendMessage", chat["id"])
        assert reply.params["text"] == apology
        assert reply.params["reply_parameters"]["message_id"] == command["message_id"]
    else:
        assert emulator.messages[(chat["id"], status["message_id"])]["text"] == apology
        assert emulator.calls_to("sendMessage", chat["id"]) == []
    assert emulator.calls_to("sendPhoto") == []
