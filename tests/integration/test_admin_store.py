"""The admin and moderation records on real databases (SQLite and PostgreSQL): the audit log,
bans, service flags, group settings, reports, and the numbers behind /stats and /queue."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from chitrakar.domain import GenerationPlan, JobKind, JobStatus
from db import audit, jobs, stats
from db.jobs import Origin
from db.models import AuditEvent, Job, User
from db.session import Store

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SINCE = NOW - timedelta(days=1)
# Times given in another zone mean the same moments.
IST = timezone(timedelta(hours=5, minutes=30))


def origin(message_id: int, user: str = "1", name: str | None = "Asha", chat_id: int = 7) -> Origin:
    chat_type = "private" if chat_id > 0 else "group"
    return Origin("telegram", chat_id, chat_type, user, name, "en", message_id)


def plan(images: int = 1) -> GenerationPlan:
    return GenerationPlan("p", 64, 64, 4, tuple(range(images)), 7.0)


def new_job(store: Store, message_id: int, user: str, name: str | None, images: int = 1) -> int:
    with store.unit_of_work() as uow:
        return jobs.take_in(
            uow, origin(message_id, user, name), JobKind.PORTRAIT, plan(images)
        ).job_id


def set_times(
    store: Store,
    job_id: int,
    created: datetime,
    wait_s: float | None = None,
    finished_after_s: float | None = None,
    generation_s: float | None = None,
) -> None:
    """Put a job's times where the test wants them (the functions write the clock's)."""
    with store.unit_of_work() as uow:
        job = uow.session.get(Job, job_id)
        assert job is not None
        job.created_at = created
        job.started_at = created + timedelta(seconds=wait_s) if wait_s is not None else None
        job.finished_at = (
            created + timedelta(seconds=finished_after_s) if finished_after_s is not None else None
        )
        job.generation_seconds = generation_s
        uow.commit()


def done(store: Store, job_id: int) -> None:
    with store.unit_of_work() as uow:
        jobs.start_job(uow, job_id, "w")
        jobs.complete_job(
            uow, job_id, result_paths=["a.png"], result_file_ids=["x"], generation_seconds=1.0
        )


# The audit log.


def test_the_audit_log_keeps_events_newest_first_and_counts_actions(store: Store) -> None:
    with store.unit_of_work() as uow:
        first = audit.record(
            uow,
            channel="telegram",
            actor="100",
            actor_role="bot_admin",
            action="ban",
            target="user:42",
            reason="spam",
            detail={"days": 7, "note": "x"},
        )
        second = audit.record(
            uow,
            channel="telegram",
            actor="200",
            actor_role="member",
            action="pause",
            chat_id=-100,
            allowed=False,
        )
        third = audit.record(uow, channel="web", actor="system", actor_role="system", action="ban")
    assert first < second < third

    with store.unit_of_work() as uow:
        entries = audit.latest(uow)
    assert [e.id for e in entries] == [third, second, first]
    ban = entries[2]
    assert ban == audit.AuditEntry(
        id=first,
        at=ban.at,
        channel="telegram",
        actor="100",
        actor_role="bot_admin",
        action="ban",
        target="user:42",
        chat_id=None,
        reason="spam",
        detail={"days": 7, "note": "x"},
        allowed=True,
    )
    assert ban.at.tzinfo is not None and ban.at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - ban.at) < timedelta(minutes=5)
    refused = entries[1]
    assert (refused.allowed, refused.chat_id, refused.detail, refused.target) == (
        False,
        -100,
        None,
        None,
    )

    with store.unit_of_work() as uow:
        assert [e.id for e in audit.latest(uow, limit=2)] == [third, second]
        assert [e.id for e in audit.latest(uow, channel="telegram")] == [second, first]
        assert audit.latest(uow, channel="nowhere") == []
        # The first event is moved to last week: it is no longer counted.
        event = uow.session.get(AuditEvent, first)
        assert event is not None
        event.at = datetime.now(UTC) - timedelta(days=7)
        uow.commit()
    with store.unit_of_work() as uow:
        since = datetime.now(UTC) - timedelta(days=1)
        assert audit.count_by_action(uow, since) == {"ban": 1, "pause": 1}
        assert audit.count_by_action(uow, since.astimezone(IST)) == {
            "ban": 1,
            "pause": 1,
        }
        assert audit.count_by_action(uow, datetime.now(UTC) - timedelta(days=30)) == {
            "ban": 2,
            "pause": 1,
        }
        assert [e.id for e in audit.latest(uow)] == [third, second, first]


# Bans.


def test_a_user_who_never_wrote_can_be_banned_and_unbanned(store: Store) -> None:
    with store.unit_of_work() as uow:
        assert not audit.is_banned(uow, "telegram", "99")
        audit.set_banned(uow, "telegram", "99", True)
    with store.unit_of_work() as uow:
        assert audit.is_banned(uow, "telegram", "99")
        # Another channel's user of the same id is someone else.
        assert not audit.is_banned(uow, "web", "99")
        audit.set_banned(uow, "telegram", "99", True)  # twice: still one row, still banned
    # Their first request keeps the ban (the row is found, not made again).
    new_job(store, 1, "99", "Mallory")
    with store.unit_of_work() as uow:
        assert audit.is_banned(uow, "telegram", "99")
        users = list(uow.session.scalars(select(User).where(User.external_id == "99")))
        assert [(u.channel, u.display_name, u.banned) for u in users] == [
            ("telegram", "Mallory", True)
        ]
        audit.set_banned(uow, "telegram", "99", False)
    with store.unit_of_work() as uow:
        assert not audit.is_banned(uow, "telegram", "99")


def test_banning_an_existing_user_keeps_their_row(store: Store) -> None:
    new_job(store, 1, "5", "Ravi")
    with store.unit_of_work() as uow:
        audit.set_banned(uow, "telegram", "5", True)
    with store.unit_of_work() as uow:
        user = uow.session.scalars(select(User).where(User.external_id == "5")).one()
        assert (user.display_name, user.banned) == ("Ravi", True)


# Service flags.


def test_service_flags_are_set_replaced_and_removed(store: Store) -> None:
    with store.unit_of_work() as uow:
        assert audit.get_flag(uow, "paused") is None
        audit.set_flag(uow, "paused", "Back at six", "100")
    with store.unit_of_work() as uow:
        assert audit.get_flag(uow, "paused") == "Back at six"
        audit.set_flag(uow, "paused", "Back at seven", "200")
        audit.set_flag(uow, "other", "x", "200")
    with store.unit_of_work() as uow:
        assert audit.get_flag(uow, "paused") == "Back at seven"
        audit.set_flag(uow, "paused", None, "200")
        audit.set_flag(uow, "never-set", None, "200")  # removing nothing is fine
    with store.unit_of_work() as uow:
        assert audit.get_flag(uow, "paused") is None
        assert audit.get_flag(uow, "other") == "x"


# Group settings.


def test_chat_settings_default_switch_and_keep_what_is_not_changed(store: Store) -> None:
    with store.unit_of_work() as uow:
        assert audit.chat_settings(uow, "telegram", -100) == audit.ChatSettingsView(
            frozenset(), frozenset(), None, False
        )
        view = audit.update_chat_settings(uow, "telegram", -100, command=("avatar", False))
    assert view.disabled_commands == frozenset({"avatar"})
    with store.unit_of_work() as uow:
        view = audit.update_chat_settings(
            uow, "telegram", -100, command=("portrait", False), style=("noir", False)
        )
        assert view == audit.chat_settings(uow, "telegram", -100)
    assert view.disabled_commands == frozenset({"avatar", "portrait"})
    assert view.disabled_styles == frozenset({"noir"})
    with store.unit_of_work() as uow:
        # Switched off twice (a second press, or another admin's), it stays off; then on.
        view = audit.update_chat_settings(uow, "telegram", -100, command=("portrait", False))
        assert view.disabled_commands == frozenset({"avatar", "portrait"})
        view = audit.update_chat_settings(uow, "telegram", -100, command=("avatar", True))
        assert view.disabled_commands == frozenset({"portrait"})
        view = audit.update_chat_settings(uow, "telegram", -100, command=("avatar", True))
        assert view.disabled_commands == frozenset({"portrait"})
        view = audit.update_chat_settings(uow, "telegram", -100, style=("noir", True))
        assert view.disabled_styles == frozenset()
        view = audit.update_chat_settings(
            uow, "telegram", -100, content_policy="spoiler", spoilers=True
        )
        assert (view.content_policy, view.spoilers) == ("spoiler", True)
        # Unset arguments leave the policy and spoilers as they are.
        view = audit.update_chat_settings(uow, "telegram", -100, style=("anime", False))
        assert (view.content_policy, view.spoilers) == ("spoiler", True)
        view = audit.update_chat_settings(uow, "telegram", -100, spoilers=False)
        assert (view.content_policy, view.spoilers) == ("spoiler", False)
        # None goes back to the deployment's policy.
        view = audit.update_chat_settings(uow, "telegram", -100, content_policy=None)
        assert view.content_policy is None
        with pytest.raises(ValueError, match="content policy"):
            audit.update_chat_settings(uow, "telegram", -100, content_policy="nsfw")
    with store.unit_of_work() as uow:
        assert audit.chat_settings(uow, "telegram", -100) == audit.ChatSettingsView(
            frozenset({"portrait"}), frozenset({"anime"}), None, False
        )
        # Each chat has its own.
        assert audit.chat_settings(uow, "telegram", -200) == audit.ChatSettingsView()
        assert audit.chat_settings(uow, "web", -100) == audit.ChatSettingsView()


def test_admins_changing_a_chats_settings_at_once_lose_no_change(store: Store) -> None:
    commands = [f"command{n}" for n in range(8)]

    def switch_off(command: str) -> None:
        with store.unit_of_work() as uow:
            audit.update_chat_settings(uow, "telegram", -100, command=(command, False))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(switch_off, commands))
    with store.unit_of_work() as uow:
        assert audit.chat_settings(uow, "telegram", -100).disabled_commands == frozenset(commands)


# Reports.


def test_reports_are_opened_once_and_decided_once(store: Store) -> None:
    job_id = new_job(store, 1, "5", "Ravi")
    with store.unit_of_work() as uow:
        assert audit.open_report(uow, job_id + 1000, "8", -100) is None
        first = audit.open_report(uow, job_id, "8", -100)
        assert first is not None and first.created
        report_id = first.id
        # The same member tapping again finds their report, and is told it is not new (its
        # admins were told already); another member makes their own.
        assert audit.open_report(uow, job_id, "8", -100) == audit.OpenedReport(report_id, False)
        second = audit.open_report(uow, job_id, "9", -100)
        assert second is not None and second.created and second.id != report_id
        other = second.id
    with store.unit_of_work() as uow:
        opened = audit.get_report(uow, report_id)
    assert opened is not None
    assert (opened.id, opened.job_id, opened.reporter, opened.chat_id, opened.status) == (
        report_id,
        job_id,
        "8",
        -100,
        "open",
    )
    assert opened.at.utcoffset() == timedelta(0)
    assert (opened.decided_by, opened.decided_at) == (None, None)

    with store.unit_of_work() as uow:
        with pytest.raises(ValueError, match="decision"):
            audit.decide_report(uow, report_id, "open", "100")
        decided = audit.decide_report(uow, report_id, "dismissed", "100")
        assert decided is not None
        assert (decided.id, decided.status, decided.decided_by) == (report_id, "dismissed", "100")
        assert decided.decided_at is not None and decided.decided_at.utcoffset() == timedelta(0)
        assert audit.decide_report(uow, report_id, "banned", "200") is None
        assert audit.decide_report(uow, report_id + 1000, "banned", "200") is None
        assert audit.get_report(uow, report_id + 1000) is None
    with store.unit_of_work() as uow:
        again = audit.get_report(uow, report_id)
        assert again is not None and (again.status, again.decided_by) == ("dismissed", "100")
        # Once decided, the same member's new report is a new one.
        reopened = audit.open_report(uow, job_id, "8", -100)
        assert reopened is not None and reopened.created
        assert reopened.id not in (report_id, other)


def test_a_report_tapped_twice_at_once_is_made_once_and_decided_once(store: Store) -> None:
    job_id = new_job(store, 1, "5", "Ravi")

    def report(_: int) -> int | None:
        with store.unit_of_work() as uow:
            opened = audit.open_report(uow, job_id, "8", -100)
            return opened.id if opened is not None else None

    with ThreadPoolExecutor(6) as pool:
        ids = set(pool.map(report, range(6)))
    assert len(ids) == 1
    (report_id,) = ids
    assert report_id is not None

    def decide(admin: int) -> audit.ReportView | None:
        with store.unit_of_work() as uow:
            return audit.decide_report(uow, report_id, "deleted", str(admin))

    with ThreadPoolExecutor(6) as pool:
        decisions = [d for d in pool.map(decide, range(6)) if d is not None]
    assert len(decisions) == 1


# Stats and the queue.


def test_stats_count_a_days_jobs(store: Store) -> None:
    asha, ravi, mina = ("1", "Asha"), ("2", "Ravi"), ("3", None)
    hour = timedelta(hours=1)

    # Done: 1, 2 and 4 images taking 1, 2 and 10 s, after waits of 1, 2 and 10 s.
    j1 = new_job(store, 1, *asha, images=1)
    j2 = new_job(store, 2, *asha, images=2)
    j3 = new_job(store, 3, *ravi, images=4)
    for job_id in (j1, j2, j3):
        done(store, job_id)
    set_times(store, j1, NOW - 5 * hour, wait_s=1, finished_after_s=3, generation_s=1)
    set_times(store, j2, NOW - 4 * hour, wait_s=2, finished_after_s=5, generation_s=2)
    set_times(store, j3, NOW - 3 * hour, wait_s=10, finished_after_s=30, generation_s=10)
    # Failed after a wait of 3 s.
    j4 = new_job(store, 4, *ravi)
    with store.unit_of_work() as uow:
        jobs.start_job(uow, j4, "w")
        jobs.fail_job(uow, j4, "boom")
    set_times(store, j4, NOW - 3 * hour, wait_s=3, finished_after_s=4)
    # Blocked by the content check, after a wait of 4 s and 0.5 s of generation.
    j5 = new_job(store, 5, *mina, images=2)
    with store.unit_of_work() as uow:
        jobs.start_job(uow, j5, "w")
        # (Set directly: what the content check records is not this test's concern.)
        row = uow.session.get(Job, j5)
        assert row is not None
        row.status = JobStatus.BLOCKED
        uow.commit()
    set_times(store, j5, NOW - 2 * hour, wait_s=4, finished_after_s=6, generation_s=0.5)
    # Cancelled before it started.
    j6 = new_job(store, 6, *asha)
    with store.unit_of_work() as uow:
        assert [j.id for j in jobs.cancel_jobs(uow, "telegram", 7, "1")] == [j6]
    set_times(store, j6, NOW - 2 * hour, finished_after_s=1)
    # A yesterday's job (Mina's 10 images) counts nowhere.
    old = new_job(store, 7, *mina, images=4)
    done(store, old)
    set_times(store, old, SINCE - hour, wait_s=100, finished_after_s=200, generation_s=100)
    # Waiting now: queued and handed over, running after a wait of 5 s, queued and held.
    j7 = new_job(store, 8, *ravi)
    j8 = new_job(store, 9, *mina)
    j9 = new_job(store, 10, *asha)
    with store.unit_of_work() as uow:
        assert jobs.claim_hand_over(uow, j7, 10)
        assert jobs.claim_hand_over(uow, j8, 10)
        jobs.start_job(uow, j8, "w")
    set_times(store, j7, NOW - hour)
    set_times(store, j8, NOW - hour + timedelta(minutes=1), wait_s=5)
    set_times(store, j9, NOW - hour + timedelta(minutes=2))
    # Created after `now`: outside the period.
    later = new_job(store, 11, "4", "Dev")
    with store.unit_of_work() as uow:
        assert [j.id for j in jobs.cancel_jobs(uow, "telegram", 7, "4")] == [later]
    set_times(store, later, NOW + hour, finished_after_s=1)

    with store.unit_of_work() as uow:
        result = stats.stats_since(uow, SINCE, NOW)
    assert result == stats.Stats(
        jobs_by_status={
            "queued": 2,
            "running": 1,
            "done": 3,
            "failed": 1,
            "cancelled": 1,
            "blocked": 1,
        },
        images=7,
        gpu_seconds=13.5,
        queue_length=3,
        held=1,
        # Waits 1, 2, 3, 4, 5, 10 s (nearest rank: the 3rd and the 6th).
        wait_median_s=3.0,
        wait_p95_s=10.0,
        generation_median_s=2.0,
        generation_p95_s=10.0,
        top_users=[("2", "Ravi", 4), ("1", "Asha", 3)],
        blocked=1,
    )

    # The same period asked for in another time zone gives the same numbers.
    with store.unit_of_work() as uow:
        assert stats.stats_since(uow, SINCE.astimezone(IST), NOW.astimezone(IST)) == result

    # Yesterday: only the old job (the waiting ones are counted whatever the period).
    with store.unit_of_work() as uow:
        yesterday = stats.stats_since(uow, SINCE - timedelta(days=1), SINCE)
    assert yesterday.jobs_by_status == {**{s.value: 0 for s in JobStatus}, "done": 1}
    assert (yesterday.images, yesterday.gpu_seconds) == (4, 100.0)
    assert (yesterday.queue_length, yesterday.held, yesterday.blocked) == (3, 1, 0)
    assert (yesterday.wait_median_s, yesterday.wait_p95_s) == (100.0, 100.0)
    assert (yesterday.generation_median_s, yesterday.generation_p95_s) == (100.0, 100.0)
    assert yesterday.top_users == [("3", None, 4)]

    with store.unit_of_work() as uow:
        queue = stats.queue_snapshot(uow)
        assert stats.queue_snapshot(uow, limit=2) == queue[:2]
    assert queue == [
        stats.QueueEntry(j7, "queued", "2", "Ravi", 7, "portrait", NOW - hour, False),
        stats.QueueEntry(
            j8, "running", "3", None, 7, "portrait", NOW - hour + timedelta(minutes=1), False
        ),
        stats.QueueEntry(
            j9, "queued", "1", "Asha", 7, "portrait", NOW - hour + timedelta(minutes=2), True
        ),
    ]


def test_stats_of_an_empty_period(store: Store) -> None:
    with store.unit_of_work() as uow:
        result = stats.stats_since(uow, SINCE, NOW)
        assert stats.queue_snapshot(uow) == []
    assert result == stats.Stats(
        jobs_by_status={s.value: 0 for s in JobStatus},
        images=0,
        gpu_seconds=0.0,
        queue_length=0,
        held=0,
        wait_median_s=None,
        wait_p95_s=None,
        generation_median_s=None,
        generation_p95_s=None,
        top_users=[],
        blocked=0,
    )


def test_top_users_are_the_five_with_most_images(store: Store) -> None:
    # Images per user: 11: 1, 12: 2, 13: 3, 14: 1 + 2, 15: 5, 16: 6.
    for message_id, (user, images) in enumerate(
        [("11", 1), ("12", 2), ("13", 3), ("14", 1), ("14", 2), ("15", 5), ("16", 6)]
    ):
        job_id = new_job(store, message_id, user, f"u{user}", images)
        done(store, job_id)
        set_times(store, job_id, NOW - timedelta(hours=1), 1, 2, 1)
    with store.unit_of_work() as uow:
        top = stats.stats_since(uow, SINCE, NOW).top_users
    # Most first; ties by external id; the sixth is left out.
    assert top == [
        ("16", "u16", 6),
        ("15", "u15", 5),
        ("13", "u13", 3),
        ("14", "u14", 3),
        ("12", "u12", 2),
    ]


def test_percentiles_are_nearest_rank() -> None:
    assert stats.percentile([], 50) is None
    assert stats.percentile([4.0], 95) == 4.0
    values = [float(n) for n in range(1, 21)]
    assert (stats.percentile(values, 50), stats.percentile(values, 95)) == (10.0, 19.0)
    assert stats.percentile(values, 100) == 20.0


def test_a_group_that_became_a_supergroup_keeps_its_settings_and_credits(store: Store) -> None:
    from datetime import date

    from chitrakar.quota import Account, group_account
    from db import ledger

    day = date(2026, 11, 28)
    old, new, taken = -400, -1_000_000_000_400, -500
    with store.unit_of_work() as uow:
        audit.update_chat_settings(uow, "telegram", old, command=("portrait", False))
        audit.update_chat_settings(uow, "telegram", taken, command=("avatar", False))
        ledger.set_account_limit(uow.session, group_account("telegram", old), 20)
        ledger.grant(uow.session, group_account("telegram", old), -3, day)  # used today
        uow.commit()

    with store.unit_of_work() as uow:
        assert audit.move_chat(uow, "telegram", old, new)
    with store.unit_of_work() as uow:
        assert audit.chat_settings(uow, "telegram", new).disabled_commands == {"portrait"}
        assert ledger.account_limit(uow.session, group_account("telegram", new)) == 20
        left = ledger.balance(uow.session, Account(group_account("telegram", new), 20), day)
        assert left == 17
        assert not audit.move_chat(uow, "telegram", old, new)  # told again: nothing left

    # A chat that has settings of its own keeps them.
    with store.unit_of_work() as uow:
        audit.update_chat_settings(uow, "telegram", -600, command=("styles", False))
        audit.move_chat(uow, "telegram", -600, taken)
    with store.unit_of_work() as uow:
        assert audit.chat_settings(uow, "telegram", taken).disabled_commands == {"avatar"}


def test_a_supergroups_jobs_move_with_it_without_clashing_with_its_own(store: Store) -> None:
    """Jobs of the old group (queued, held or done) move to the new id, so that /cancel and
    /history find them there; the new chat's message ids count from 1 again, so a command
    there with the id of an old one is a new request, not a repeat."""
    old, new = -401, -1_000_000_000_401
    with store.unit_of_work() as uow:
        before = jobs.take_in(uow, origin(5, chat_id=old), JobKind.PORTRAIT, plan()).job_id
    with store.unit_of_work() as uow:
        assert jobs.move_to_chat(uow, "telegram", old, new) == 1
        uow.commit()
    with store.unit_of_work() as uow:
        after = jobs.take_in(uow, origin(5, chat_id=new), JobKind.PORTRAIT, plan()).job_id
    assert after != before
    with store.unit_of_work() as uow:
        moved = jobs.get_job(uow, before)
        assert moved is not None
        assert (moved.chat_id, moved.request_message_id) == (new, None)
