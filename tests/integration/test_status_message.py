"""The bot hands a job over while its status message is still on its way, and records the
message once sent. Whichever of the bot's record and the worker's (the results, just before
it sends them) comes first, the status message is shown progress on and removed exactly once:
by the worker when it saw the message, by the bot when the worker had gone past. The real
worker service, tiny model, store (SQLite and PostgreSQL) and Bot API emulator."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from chitrakar.domain import GenerationPlan, JobKind
from chitrakar.media import png_bytes
from chitrakar.texts import text
from db import jobs, privacy
from db.jobs import Origin
from db.migrate import upgrade_to_head
from tests.support.botapi import BotApiEmulator
from tests.support.stack import worker_settings
from workers.runtime import WorkerRuntime
from workers.service import run_job


@pytest.fixture
def runtime(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, database_url: str
) -> Iterator[WorkerRuntime]:
    settings = worker_settings(emulator, tmp_path, tiny_model, database_url=database_url)
    upgrade_to_head(settings.resolved_database_url)
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    try:
        yield runtime
    finally:
        runtime.close()


def _job(
    emulator: BotApiEmulator,
    runtime: WorkerRuntime,
    user_id: int,
    kind: JobKind = JobKind.PORTRAIT,
) -> tuple[int, Any]:
    """A handed-over job with no status message recorded yet, and the status message the
    bot sent meanwhile."""
    user = emulator.user(user_id, "Meera")
    chat = emulator.private_chat(user)
    command = emulator.history_message(chat, user, "/portrait a lighthouse")
    status = emulator.history_message(chat, None, text("en", "status.queued", position=1))
    origin = Origin(
        "telegram", chat["id"], "private", str(user_id), "Meera", "en", command["message_id"]
    )
    plan = GenerationPlan("a lighthouse", 64, 64, 3, (5,), 7.0)
    with runtime.store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, origin, kind, plan).job_id
    with runtime.store.unit_of_work() as uow:
        assert jobs.claim_hand_over(uow, job_id, limit=2)
    return job_id, status


def _grid_made_already(runtime: WorkerRuntime) -> None:
    """The style preview grid on disk, as a worker finds it after the first /styles."""
    grid = runtime.media.grid_path(runtime.settings.model_label, runtime.catalogue)
    grid.parent.mkdir(parents=True, exist_ok=True)
    grid.write_bytes(png_bytes(Image.new("RGB", (96, 64), "teal")))


def _view(runtime: WorkerRuntime, job_id: int) -> jobs.JobView | None:
    with runtime.store.unit_of_work() as uow:
        return jobs.get_job(uow, job_id)


def _attach(runtime: WorkerRuntime, job_id: int, message_id: int) -> bool:
    with runtime.store.unit_of_work() as uow:
        return jobs.attach_status_message(uow, job_id, message_id)


def _edits_and_deletes(emulator: BotApiEmulator, status: Any) -> tuple[list[str], int]:
    chat_id, message_id = status["chat"]["id"], status["message_id"]
    edits = [
        call.params["text"]
        for call in emulator.calls_to("editMessageText", chat_id)
        if call.params["message_id"] == message_id
    ]
    deletes = [
        call
        for call in emulator.calls_to("deleteMessage", chat_id)
        if call.params["message_id"] == message_id
    ]
    return edits, len(deletes)


def test_recorded_while_the_job_runs_it_shows_progress_and_the_worker_removes_it(
    emulator: BotApiEmulator, runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, status = _job(emulator, runtime, 1201)
    start_job = jobs.start_job
    watched: list[bool] = []

    def started_then_recorded(*args: Any, **kwargs: Any) -> Any:
        view = start_job(*args, **kwargs)  # commits: the worker holds the job
        watched.append(_attach(runtime, job_id, status["message_id"]))
        return view

    monkeypatch.setattr(jobs, "start_job", started_then_recorded)
    run_job(runtime, job_id)

    assert watched == [True]
    edits, deletes = _edits_and_deletes(emulator, status)
    # The worker took the job before the message was recorded, and found it at its first look.
    assert edits and edits[0] == text("en", "status.running")
    assert deletes == 1
    assert emulator.messages[(status["chat"]["id"], status["message_id"])].get("deleted")
    assert len(emulator.calls_to("sendPhoto", status["chat"]["id"])) == 1


@pytest.mark.parametrize("kind", [JobKind.PORTRAIT, JobKind.PREVIEWS])
def test_recorded_just_before_the_results_the_worker_removes_it(
    emulator: BotApiEmulator,
    runtime: WorkerRuntime,
    monkeypatch: pytest.MonkeyPatch,
    kind: JobKind,
) -> None:
    """After the worker's last look during the run, before it records the results (a preview
    grid records none, and may take no look at all: here it is made already)."""
    if kind == JobKind.PREVIEWS:
        _grid_made_already(runtime)
    job_id, status = _job(emulator, runtime, 1206, kind)
    record_results = jobs.record_results
    watched: list[bool] = []

    def recorded_then_results(*args: Any, **kwargs: Any) -> Any:
        watched.append(_attach(runtime, job_id, status["message_id"]))
        return record_results(*args, **kwargs)

    monkeypatch.setattr(jobs, "record_results", recorded_then_results)
    run_job(runtime, job_id)

    assert watched == [True]
    edits, deletes = _edits_and_deletes(emulator, status)
    assert edits == []  # the run never saw it
    assert deletes == 1
    assert len(emulator.calls_to("sendPhoto", status["chat"]["id"])) == 1
    view = _view(runtime, job_id)
    assert view is not None and view.status == "done"
    # Once a job ended, a status message recorded late is left to the bot.
    assert _attach(runtime, job_id, status["message_id"] + 1) is False


@pytest.mark.parametrize("kind", [JobKind.PORTRAIT, JobKind.PREVIEWS])
def test_recorded_once_the_results_are_on_their_way_it_is_left_to_the_bot(
    emulator: BotApiEmulator,
    runtime: WorkerRuntime,
    monkeypatch: pytest.MonkeyPatch,
    kind: JobKind,
) -> None:
    if kind == JobKind.PREVIEWS:
        _grid_made_already(runtime)
    job_id, status = _job(emulator, runtime, 1207, kind)
    record_results = jobs.record_results
    watched: list[bool] = []

    def results_then_recorded(*args: Any, **kwargs: Any) -> Any:
        recorded = record_results(*args, **kwargs)
        watched.append(_attach(runtime, job_id, status["message_id"]))
        return recorded

    monkeypatch.setattr(jobs, "record_results", results_then_recorded)
    run_job(runtime, job_id)

    assert watched == [False]
    edits, deletes = _edits_and_deletes(emulator, status)
    assert edits == [] and deletes == 0  # the worker never knew of it: the bot removes it
    view = _view(runtime, job_id)
    # Not recorded either: nothing else (an apology, say) will edit it.
    assert view is not None and view.status_message_id is None


def test_recorded_after_the_results_the_worker_leaves_it_to_the_bot(
    emulator: BotApiEmulator, runtime: WorkerRuntime
) -> None:
    job_id, status = _job(emulator, runtime, 1202)
    run_job(runtime, job_id)
    assert _attach(runtime, job_id, status["message_id"]) is False
    edits, deletes = _edits_and_deletes(emulator, status)
    assert edits == [] and deletes == 0  # the worker never knew of it
    view = _view(runtime, job_id)
    assert view is not None and view.status_message_id is None


def test_the_results_record_tells_the_worker_which_message_to_remove(
    emulator: BotApiEmulator, runtime: WorkerRuntime
) -> None:
    job_id, status = _job(emulator, runtime, 1203)
    with runtime.store.unit_of_work() as uow:
        assert jobs.start_job(uow, job_id, runtime.name) is not None
    with runtime.store.unit_of_work() as uow:
        assert jobs.record_results(uow, job_id, runtime.name, ["results/a.png"], ["00"]) is None
    # Recorded after the results: the bot must remove it itself.
    assert _attach(runtime, job_id, status["message_id"]) is False

    other_id, other_status = _job(emulator, runtime, 1204)
    with runtime.store.unit_of_work() as uow:
        assert jobs.start_job(uow, other_id, runtime.name) is not None
    assert _attach(runtime, other_id, other_status["message_id"]) is True
    with runtime.store.unit_of_work() as uow:
        recorded = jobs.record_results(uow, other_id, runtime.name, ["results/b.png"], ["00"])
    assert recorded == other_status["message_id"]


def test_a_job_that_ended_or_is_gone_leaves_its_status_message_to_the_bot(
    emulator: BotApiEmulator, runtime: WorkerRuntime
) -> None:
    job_id, status = _job(emulator, runtime, 1205)
    with runtime.store.unit_of_work() as uow:
        jobs.cancel_jobs(uow, "telegram", None, "1205")
    assert _attach(runtime, job_id, status["message_id"]) is False
    gone_id, gone_status = _job(emulator, runtime, 1208)
    with runtime.store.unit_of_work() as uow:
        assert privacy.delete(uow.session, "telegram", "1208", date.today()) is not None
        uow.commit()
    assert _attach(runtime, gone_id, gone_status["message_id"]) is False
