"""The content check in the worker: a flagged image is blocked (not sent, refunded, recorded
for review) or sent under a spoiler, as the chat's policy says. The real worker service,
model and Bot API calls; the classifier's verdict is a stand-in (the real classifier is
tested on real photographs in test_classifier.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from chitrakar.domain import Command, JobStatus, parse_image_command
from chitrakar.quota import Account
from chitrakar.services import JobIntake
from chitrakar.texts import text
from db import audit, jobs, ledger
from db.jobs import Origin
from db.migrate import upgrade_to_head
from tests.support.botapi import BotApiEmulator
from tests.support.stack import jobs_in_chat, worker_settings
from workers.classifier import ImageVerdict
from workers.delivery import TelegramDelivery
from workers.runtime import WorkerRuntime
from workers.service import run_job


class Flags:
    """A classifier that flags every image (or none)."""

    def __init__(self, flagged: bool) -> None:
        self.flagged = flagged

    def classify_all(self, images: list[Image.Image]) -> list[ImageVerdict]:
        if not self.flagged:
            return [ImageVerdict(flagged=False, labels=(), score=0.0) for _ in images]
        verdict = ImageVerdict(flagged=True, labels=("FEMALE_BREAST_EXPOSED:0.91",), score=0.91)
        return [verdict for _ in images]


def worker_for(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path, classifier: object
) -> WorkerRuntime:
    """The real worker runtime, its content check's verdicts from `classifier`."""
    settings = worker_settings(emulator, tmp_path, tiny_model, image_size=64, default_steps=2)
    upgrade_to_head(settings.resolved_database_url)
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    runtime.__dict__["classifier"] = classifier
    return runtime


def intake_for(runtime: WorkerRuntime) -> JobIntake:
    return JobIntake(
        runtime.settings,
        runtime.store,
        lambda _: None,
        runtime.catalogue,
        runtime.media,
        runtime.artifacts,
    )


def portrait_in(emulator: BotApiEmulator, runtime: WorkerRuntime, group: dict[str, Any]) -> None:
    """Mohan's `/portrait` in the group, taken in as the bot does and run by the worker."""
    user = emulator.user(831, "Mohan")
    command = emulator.history_message(group, user, "/portrait a beach at noon")
    status = emulator.history_message(group, None, "Queued.")
    intake = intake_for(runtime)
    who = Origin("telegram", group["id"], "group", "831", "Mohan", "en", command["message_id"])
    accepted = intake.accept(who, parse_image_command(Command.PORTRAIT, "a beach at noon"))
    intake.attach_status_message(accepted.job_id, status["message_id"])
    intake.dispatch(accepted)
    run_job(runtime, accepted.job_id)


def assert_channel_keeps_nothing(runtime: WorkerRuntime) -> None:
    """Telegram's delivery holds no progress state or upload action of an ended job."""
    telegram = runtime.delivery.channel("telegram")
    assert isinstance(telegram, TelegramDelivery)
    assert not telegram._uploading and not telegram._throttles and not telegram._edits


@pytest.mark.parametrize(
    ("flagged", "policy", "spoilers", "outcome"),
    [
        (True, None, False, "blocked"),  # the deployment's default policy: block
        (True, "spoiler", False, "spoiler"),
        (True, "allow", False, "sent"),
        (False, None, True, "spoiler"),  # the group wants every result under a spoiler
        (False, None, False, "sent"),
    ],
)
def test_a_flagged_image_follows_the_chats_policy(
    emulator: BotApiEmulator,
    tmp_path: Path,
    tiny_model: Path,
    flagged: bool,
    policy: str | None,
    spoilers: bool,
    outcome: str,
) -> None:
    runtime = worker_for(emulator, tmp_path, tiny_model, Flags(flagged))
    settings = runtime.settings
    group = emulator.group_chat(-831)
    with runtime.store.unit_of_work() as uow:
        audit.update_chat_settings(
            uow, "telegram", group["id"], content_policy=policy, spoilers=spoilers or None
        )
    # The "uploading a photo" action, sent during the check, answered late: whatever the
    # verdict, what the chat hears next comes after it has landed.
    emulator.delay("sendChatAction", 0.3)
    try:
        portrait_in(emulator, runtime, group)
        # Nothing about the ended job is kept by the channel, whatever the outcome.
        assert_channel_keeps_nothing(runtime)
    finally:
        runtime.close()

    [action] = emulator.calls_to("sendChatAction", group["id"])
    after = [
        c for c in emulator.calls if c.params.get("chat_id") == group["id"] and c.at > action.at
    ]
    assert after and all(c.at >= action.at + 0.3 for c in after)
    [job] = jobs_in_chat(settings.resolved_database_url, group["id"])
    photos = emulator.calls_to("sendPhoto", group["id"])
    with runtime.store.unit_of_work() as uow:
        left = ledger.balance(
            uow.session,
            Account("user:telegram:831", settings.daily_quota),
            intake_for(runtime).quota_day(),
        )
        events = audit.latest(uow)
    if outcome == "blocked":
        assert job.status == JobStatus.BLOCKED and photos == []
        assert left == settings.daily_quota  # refunded
        notice = emulator.calls_to("editMessageText", group["id"])[-1]
        assert notice.params["text"] == text("en", "moderation.blocked_result")
        # Kept for review: the event names the job and what was found; the image is stored.
        assert events[0].action == "output_block" and events[0].target == f"job:{job.id}"
        assert events[0].detail == {
            "labels": ["FEMALE_BREAST_EXPOSED:0.91"],
            "requester": "831",
        }
        assert runtime.artifacts.keys(f"results/{job.id}/")
        return
    assert job.status == JobStatus.DONE and len(photos) == 1
    assert left == settings.daily_quota - 1
    assert bool(photos[0].params.get("has_spoiler")) is (outcome == "spoiler")
    # A flagged image that was still sent is recorded too.
    assert [e.action for e in events if e.target == f"job:{job.id}"] == (
        [f"output_{'spoiler' if policy == 'spoiler' else 'send'}"] if flagged else []
    )


class WaitsForTheChatAction:
    """A content check that passes every image, once the chat has been told a photo is on
    its way (or a timeout has passed): whether it was told during the check."""

    def __init__(self, emulator: BotApiEmulator, chat_id: int) -> None:
        self.emulator, self.chat_id = emulator, chat_id
        self.told_during_check: list[bool] = []

    def classify_all(self, images: list[Image.Image]) -> list[ImageVerdict]:
        def told() -> bool:
            actions = self.emulator.calls_to("sendChatAction", self.chat_id)
            return any(call.params.get("action") == "upload_photo" for call in actions)

        deadline = time.monotonic() + 10
        while not told() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.told_during_check.append(told())
        return [ImageVerdict(flagged=False, labels=(), score=0.0) for _ in images]


def test_the_chat_is_told_a_photo_is_coming_while_it_is_checked(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    """The "uploading a photo" action goes out while the images are checked and stored, not
    after (across the internet its round trip would be one more wait before the photo); the
    photo still goes out only once the action has landed, or a client would show "sending a
    photo" under it."""
    group = emulator.group_chat(-832)
    check = WaitsForTheChatAction(emulator, group["id"])
    runtime = worker_for(emulator, tmp_path, tiny_model, check)
    emulator.delay("sendChatAction", 0.5)
    try:
        portrait_in(emulator, runtime, group)
    finally:
        runtime.close()

    assert check.told_during_check == [True]
    [action] = emulator.calls_to("sendChatAction", group["id"])
    [photo] = emulator.calls_to("sendPhoto", group["id"])
    assert photo.at >= action.at + 0.5


class CancelledWhileChecked:
    """Flags every image, and its user cancels the job while the check runs."""

    def __init__(self, runtime: WorkerRuntime, chat_id: int) -> None:
        self.runtime, self.chat_id = runtime, chat_id

    def classify_all(self, images: list[Image.Image]) -> list[ImageVerdict]:
        with self.runtime.store.unit_of_work() as uow:
            assert jobs.cancel_jobs(uow, "telegram", self.chat_id, "831")
        verdict = ImageVerdict(flagged=True, labels=("FEMALE_BREAST_EXPOSED:0.91",), score=0.91)
        return [verdict for _ in images]


def test_a_job_cancelled_while_checked_is_neither_sent_nor_kept_by_the_channel(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    """Flagged, but its user cancelled it meanwhile: the job stays cancelled (nothing to
    block, no notice over the bot's "Cancelled.": only "Cancelled." again, in case the
    worker's last status edit crossed the bot's), no photo goes out, and the channel keeps
    nothing about it (its upload action included)."""
    group = emulator.group_chat(-833)
    runtime = worker_for(emulator, tmp_path, tiny_model, None)
    runtime.__dict__["classifier"] = CancelledWhileChecked(runtime, group["id"])
    try:
        portrait_in(emulator, runtime, group)
        assert_channel_keeps_nothing(runtime)
    finally:
        runtime.close()

    [job] = jobs_in_chat(runtime.settings.resolved_database_url, group["id"])
    assert job.status == JobStatus.CANCELLED
    assert emulator.calls_to("sendPhoto", group["id"]) == []
    edits = [edit.params["text"] for edit in emulator.calls_to("editMessageText", group["id"])]
    # A progress edit may come between them when the machine is slow (it is throttled by time).
    progress = {text("en", "status.progress", percent=p) for p in range(101)}
    assert edits[0] == text("en", "status.running")
    assert edits[-1] == text("en", "cancel.status")
    assert set(edits[1:-1]) <= progress, edits


class HandedBackWhileChecked:
    """Passes every image; meanwhile the reconciler takes the worker for dead (it wrote no
    heartbeat) and hands its job back to the queue."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.handed: list[int] = []

    def classify_all(self, images: list[Image.Image]) -> list[ImageVerdict]:
        with self.runtime.store.unit_of_work() as uow:
            self.handed += jobs.hand_back_from_dead_workers(uow, set())
        return [ImageVerdict(flagged=False, labels=(), score=0.0) for _ in images]


def test_a_job_handed_back_while_checked_is_sent_once_by_its_next_run(
    emulator: BotApiEmulator, tmp_path: Path, tiny_model: Path
) -> None:
    """Its last look came before the check: the results record finds it no longer this
    worker's, so this run sends nothing (another worker would send it too); the run its new
    message starts sends it, once."""
    group = emulator.group_chat(-834)
    runtime = worker_for(emulator, tmp_path, tiny_model, None)
    check = HandedBackWhileChecked(runtime)
    runtime.__dict__["classifier"] = check
    try:
        portrait_in(emulator, runtime, group)
        [job] = jobs_in_chat(runtime.settings.resolved_database_url, group["id"])
        assert check.handed == [job.id]
        assert job.status == JobStatus.QUEUED
        assert emulator.calls_to("sendPhoto", group["id"]) == []
        assert_channel_keeps_nothing(runtime)

        runtime.__dict__["classifier"] = Flags(flagged=False)
        run_job(runtime, job.id)
    finally:
        runtime.close()
    [job] = jobs_in_chat(runtime.settings.resolved_database_url, group["id"])
    assert (job.status, job.attempts) == (JobStatus.DONE, 2)
    assert len(emulator.calls_to("sendPhoto", group["id"])) == 1
