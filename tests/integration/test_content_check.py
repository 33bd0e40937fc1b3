"""The content check in the worker: a flagged image is blocked (not sent, refunded, recorded
for review) or sent under a spoiler, as the chat's policy says. The real worker service,
model and Bot API calls; the classifier's verdict is a stand-in (the real classifier is
tested on real photographs in test_classifier.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from chitrakar.domain import Command, JobStatus, parse_image_command
from chitrakar.quota import Account
from chitrakar.services import JobIntake
from chitrakar.texts import text
from db import audit, ledger
from db.jobs import Origin
from db.migrate import upgrade_to_head
from tests.support.botapi import BotApiEmulator
from tests.support.stack import jobs_in_chat, worker_settings
from workers.classifier import ImageVerdict
from workers.runtime import WorkerRuntime
from workers.service import run_job


class Flags:
    """A classifier that flags every image (or none)."""

    def __init__(self, flagged: bool) -> None:
        self.flagged = flagged

    def classify(self, image: Image.Image) -> ImageVerdict:
        if not self.flagged:
            return ImageVerdict(flagged=False, labels=(), score=0.0)
        return ImageVerdict(flagged=True, labels=("FEMALE_BREAST_EXPOSED:0.91",), score=0.91)


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
    settings = worker_settings(
        emulator,
        tmp_path,
        tiny_model,
        image_size=64,
        default_steps=2,
    )
    upgrade_to_head(settings.resolved_database_url)
    user = emulator.user(831, "Mohan")
    group = emulator.group_chat(-831)
    command = emulator.history_message(group, user, "/portrait a beach at noon")
    status = emulator.history_message(group, None, "Queued.")
    runtime = WorkerRuntime(settings, publish=lambda _job_id: None)
    runtime.__dict__["classifier"] = Flags(flagged)
    with runtime.store.unit_of_work() as uow:
        audit.update_chat_settings(
            uow, "telegram", group["id"], content_policy=policy, spoilers=spoilers or None
        )
    intake = JobIntake(
        settings, runtime.store, lambda _: None, runtime.catalogue, runtime.media, runtime.artifacts
    )
    who = Origin("telegram", group["id"], "group", "831", "Mohan", "en", command["message_id"])
    accepted = intake.accept(who, parse_image_command(Command.PORTRAIT, "a beach at noon"))
    intake.attach_status_message(accepted.job_id, status["message_id"])
    intake.dispatch(accepted)
    try:
        run_job(runtime, accepted.job_id)
    finally:
        runtime.close()

    [job] = jobs_in_chat(settings.resolved_database_url, group["id"])
    photos = emulator.calls_to("sendPhoto", group["id"])
    with runtime.store.unit_of_work() as uow:
        left = ledger.balance(
            uow.session, Account("user:telegram:831", settings.daily_quota), intake.quota_day()
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
