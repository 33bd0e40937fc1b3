"""What the bot says, composed without a chat: every channel gets the same texts and buttons."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from chitrakar import replies
from chitrakar.buttons import Action, Button, ButtonPress
from chitrakar.config import Settings
from chitrakar.domain import Command, CommandError, GenerationPlan, JobKind, JobStatus
from chitrakar.services import QuotaStatus
from chitrakar.styles import load_catalogue
from chitrakar.texts import LANGUAGES, text
from db.audit import AuditEntry
from db.jobs import JobView
from db.stats import QueueEntry, Stats

KOLKATA = ZoneInfo("Asia/Kolkata")


def job(
    job_id: int,
    kind: JobKind = JobKind.PORTRAIT,
    prompt: str = "a tabby cat on a windowsill",
    seeds: tuple[int, ...] = (7,),
    input_path: str | None = None,
    cost: int = 1,
) -> JobView:
    return JobView(
        id=job_id,
        kind=kind,
        status=JobStatus.DONE,
        channel="telegram",
        chat_id=100,
        chat_type="private",
        requester="42",
        request_message_id=5,
        status_message_id=6,
        language="en",
        plan=GenerationPlan(
            prompt=prompt, width=512, height=512, steps=20, seeds=seeds, guidance_scale=6.5
        ),
        attempts=1,
        # 09:00 UTC is 14:30 in Kolkata.
        created_at=datetime(2025, 3, 4, 9, 0, tzinfo=UTC),
        started_at=None,
        input_path=input_path,
        cost=cost,
    )


def presses(rows: list[list[Button]] | None) -> list[list[ButtonPress]]:
    assert rows is not None
    return [[button.press for button in row] for row in rows]


@pytest.mark.parametrize("language", LANGUAGES)
def test_usage_names_the_default_steps_and_the_command(language: str) -> None:
    portrait = replies.usage(language, 37)
    assert "37" in portrait
    assert portrait == replies.usage(language, 37, Command.PORTRAIT)
    assert replies.usage(language, 37, Command.AVATAR) != portrait
    assert "/avatar" in replies.usage(language, 37, Command.AVATAR)


def test_a_malformed_command_shows_its_usage_and_a_refusal_does_not() -> None:
    malformed = CommandError("error.prompt_missing")
    reply = replies.command_error("en", 31, Command.AVATAR, malformed)
    assert reply == text("en", "error.prompt_missing") + "\n\n" + replies.usage(
        "en", 31, Command.AVATAR
    )

    refused = CommandError("quota.exceeded", cost=2, left=1, resets="00:00 UTC")
    reply = replies.command_error("en", 31, Command.PORTRAIT, refused)
    assert reply == text("en", "quota.exceeded", cost=2, left=1, resets="00:00 UTC")
    assert "/portrait" not in reply


def test_quota_shows_the_credits_and_when_they_renew() -> None:
    status = QuotaStatus(
        user_left=13,
        user_limit=20,
        group_left=None,
        group_limit=None,
        resets_at=datetime(2025, 3, 5, 0, 0, tzinfo=KOLKATA),
    )
    reply = replies.quota_reply("en", status, "Asia/Kolkata")
    assert "13 of 20" in reply
    assert "00:00 Asia/Kolkata" in reply
    assert "group" not in reply.lower()

    grouped = QuotaStatus(13, 20, 40, 50, datetime(2025, 3, 5, 23, 30, tzinfo=UTC))
    reply = replies.quota_reply("en", grouped, "UTC")
    assert "23:30 UTC" in reply
    assert reply.endswith("\n\n" + text("en", "quota.group_status", left=40, limit=50))


def test_no_history_is_said_plainly_with_no_buttons() -> None:
    assert replies.history_reply("en", [], 1, 1, KOLKATA, "42") == (
        text("en", "history.empty"),
        None,
    )


def test_a_history_page_numbers_its_jobs_in_local_time_with_buttons() -> None:
    long_prompt = "x" * 100
    past = [
        job(11),
        job(12, JobKind.AVATAR, seeds=(1, 2, 3, 4), input_path=None),  # selfie gone
        job(13, JobKind.UPSCALE, prompt=long_prompt),
    ]
    reply, rows = replies.history_reply("en", past, 2, 3, KOLKATA, "42")
    header, body = reply.split("\n\n", 1)
    assert header == text("en", "history.header", page=2, pages=3)
    lines = body.split("\n")
    assert len(lines) == 3
    assert lines[0].startswith("1. 04 Mar 14:30")
    assert "a tabby cat on a windowsill" in lines[0]
    assert text("en", "history.kind_avatar") in lines[1]
    assert lines[2].startswith("3. ")
    shown = "x" * (replies.HISTORY_PROMPT_CHARS - 1) + "…"
    assert lines[2].endswith(shown)

    assert presses(rows) == [
        [ButtonPress(Action.RESEND, job_id=11), ButtonPress(Action.AGAIN, job_id=11)],
        # An avatar set without its selfie, and an upscale, cannot be made again.
        [ButtonPress(Action.RESEND, job_id=12)],
        [ButtonPress(Action.RESEND, job_id=13)],
        [
            ButtonPress(Action.HISTORY, owner="42", page=1),
            ButtonPress(Action.HISTORY, owner="42", page=3),
        ],
    ]


def test_privacy_states_the_deployments_rules() -> None:
    kept = Settings(daily_quota=17, retention_days=7.5, input_retention_hours=2)
    reply = replies.privacy_reply("en", kept)
    assert "17 a day" in reply
    assert "7.5 days" in reply
    assert text("en", "privacy.input_after", hours="2") in reply

    dropped = Settings(input_retention_hours=0)
    assert text("en", "privacy.input_at_end") in replies.privacy_reply("en", dropped)


def test_the_styles_listing_names_every_style_and_trims_to_fit() -> None:
    catalogue = load_catalogue()
    full = replies.styles_listing("en", catalogue, 4096)
    for style in catalogue.styles.values():
        assert f"({style.key})" in full
    assert not full.endswith("…")

    limit = len(full) // 2
    trimmed = replies.styles_listing("en", catalogue, limit)
    assert len(trimmed) <= limit
    assert trimmed.endswith("…")
    first = next(iter(catalogue.styles.values()))
    assert f"({first.key})" in trimmed


def test_cancel_counts_the_jobs_and_the_credits_back() -> None:
    reply = replies.cancel_reply("en", [job(1, cost=2), job(2, cost=4)])
    assert reply == text("en", "cancel.done", count=2, credits=6)


def test_stats_show_the_figures_and_a_dash_for_what_is_missing() -> None:
    figures = Stats(
        jobs_by_status={"queued": 0, "done": 9, "failed": 1},
        images=23,
        gpu_seconds=61.4,
        queue_length=3,
        held=1,
        wait_median_s=1.25,
        wait_p95_s=None,
        generation_median_s=None,
        generation_p95_s=None,
        top_users=[("42", "Asha", 12), ("43", None, 5)],
        blocked=2,
    )
    reply = replies.stats_reply("en", figures, {"grant": 1, "ban": 2}, "Asia/Kolkata")
    assert "(Asia/Kolkata)" in reply
    assert "Jobs: done 9, failed 1\n" in reply
    assert "Images: 23 · GPU time: 61 s · blocked: 2" in reply
    assert "3 (1 held back)" in reply
    assert "median 1.2 s · p95 –" in reply  # 1.25 rounds to even
    assert "Top users: Asha 12, 43 5" in reply
    assert reply.endswith("ban 2, grant 1")

    idle = Stats({"done": 0}, 0, 0.0, 0, 0, None, None, None, None, [], 0)
    reply = replies.stats_reply("en", idle, {}, "UTC")
    assert "Jobs: 0\n" in reply
    assert "Top users: –" in reply
    assert reply.endswith("events: –")


def test_the_queue_lists_each_job_or_says_it_is_empty() -> None:
    assert replies.queue_reply("en", []) == text("en", "admin.queue_empty")
    entries = [
        QueueEntry(7, "running", "42", "Asha", 100, "portrait", datetime.now(UTC), held=False),
        QueueEntry(8, "queued", "43", None, -200, "avatar", datetime.now(UTC), held=True),
    ]
    assert replies.queue_reply("en", entries).split("\n") == [
        text("en", "admin.queue_header"),
        "#7 running · portrait · Asha · chat 100",
        "#8 queued (held) · avatar · 43 · chat -200",
    ]


def test_the_audit_log_lists_each_event_or_says_there_are_none() -> None:
    assert replies.audit_reply("en", [], KOLKATA) == text("en", "admin.audit_empty")
    events = [
        AuditEntry(
            id=1,
            at=datetime(2025, 3, 4, 9, 0, tzinfo=UTC),
            channel="telegram",
            actor="1",
            actor_role="bot_admin",
            action="ban",
            target="42",
            chat_id=None,
            reason="r" * 200,
            detail=None,
            allowed=False,
        )
    ]
    header, line = replies.audit_reply("en", events, KOLKATA).split("\n")
    assert header == text("en", "admin.audit_header")
    assert line == "04 Mar 14:30 · 1 (bot_admin) · ban (refused) · 42 " + "r" * 80


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["123", "rest", "of it"], ("123", ["rest", "of it"])),
        (["123"], ("123", [])),
        (["abc"], (None, ["abc"])),
        (["-5", "x"], (None, ["-5", "x"])),
        ([], (None, [])),
        # As ids are stored: a ban of "0123456789" banned a user who does not exist.
        (["0123456789", "spam"], ("123456789", ["spam"])),
        # Digits of other scripts name no user (isdecimal takes them).
        (["१२३४५६७८९"], (None, ["१२३४५६७८९"])),
        (["１２３４５６７８９"], (None, ["１２３４５６７８９"])),
        # Longer than any 64-bit id (and than the column that stores ids).
        (["1" * 21], (None, ["1" * 21])),
        (["1" * 20], ("1" * 20, [])),
    ],
)
def test_an_admin_command_names_its_user_by_a_leading_id(
    words: list[str], expected: tuple[str | None, list[str]]
) -> None:
    assert replies.admin_target(words) == expected
