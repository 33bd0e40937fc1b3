"""Admin actions on real databases: a ban stops the user's jobs (refunded), a deleted result
cannot be sent again, bot admins cannot be banned by a review, /pause holds the hand-over of
held jobs until /resume, /grant and /setquota change what the user may spend."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from chitrakar.artifacts import LocalArtifactStore
from chitrakar.buttons import Action, ButtonPress, ButtonRefused
from chitrakar.config import Settings
from chitrakar.domain import Command, CommandError, parse_image_command
from chitrakar.media import MediaStore
from chitrakar.moderation import MAX_PAUSE_NOTICE_CHARS, Actor, Moderation
from chitrakar.permissions import Role
from chitrakar.privacy import PrivacyService
from chitrakar.services import JobIntake
from chitrakar.styles import load_catalogue
from db import audit, jobs
from db.jobs import Origin
from db.migrate import upgrade_to_head
from db.session import Store

ADMIN = "9001"


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> tuple[JobIntake, Moderation, Store, deque[int]]:
    upgrade_to_head(database_url)
    store = Store(database_url)
    settings = Settings(
        data_dir=tmp_path, image_size=64, default_steps=4, daily_quota=10, admin_ids=ADMIN
    )
    broker: deque[int] = deque()
    artifacts = LocalArtifactStore(tmp_path)
    intake = JobIntake(
        settings, store, broker.append, load_catalogue(), MediaStore(settings.media_dir), artifacts
    )
    return intake, Moderation(settings, store, artifacts), store, broker


def origin(user: str, message_id: int, chat_id: int = -100) -> Origin:
    return Origin("telegram", chat_id, "group", user, user, "en", message_id)


def admin(chat_id: int = -100) -> Actor:
    return Actor("telegram", ADMIN, Role.BOT_ADMIN, chat_id)


def test_a_ban_stops_the_users_jobs_and_refunds_them(world) -> None:  # type: ignore[no-untyped-def]
    intake, moderation, store, _broker = world
    request = parse_image_command(Command.PORTRAIT, "a market --n 2")
    for n in range(3):  # two handed over, one held
        accepted = intake.accept(origin("7", n + 1), request)
        intake.dispatch(accepted)
    assert intake.quota_status(origin("7", 9)).user_left == 4
    moderation.ban(admin(), "7", True, "spam")
    with store.unit_of_work() as uow:
        assert jobs.active_job_ids(uow) == []
        assert audit.is_banned(uow, "telegram", "7")
    assert intake.quota_status(origin("7", 9)).user_left == 10
    with pytest.raises(CommandError) as refused:
        moderation.ban(admin(), ADMIN, True, None)
    assert refused.value.key == "admin.cannot_ban_admin"
    store.dispose()


def _done_job(intake: JobIntake, store: Store, user: str) -> int:
    accepted = intake.accept(origin(user, 1), parse_image_command(Command.PORTRAIT, "a kite"))
    intake.dispatch(accepted)
    stored = intake.artifacts.put(f"results/{accepted.job_id}/0-1.png", b"png")
    with store.unit_of_work() as uow:
        jobs.start_job(uow, accepted.job_id, "w")
        jobs.complete_job(
            uow,
            accepted.job_id,
            result_paths=[stored.key],
            result_checksums=[stored.sha256],
            result_file_ids=["telegram-file"],
            generation_seconds=1.0,
        )
        jobs.record_result_messages(uow, accepted.job_id, -100, [55])
    return accepted.job_id


def test_a_reported_result_deleted_cannot_be_sent_again(world) -> None:  # type: ignore[no-untyped-def]
    intake, moderation, store, _ = world
    job_id = _done_job(intake, store, "8")
    member = Actor("telegram", "5", Role.MEMBER, -100)
    opened, job = moderation.report(member, 55)
    assert job.id == job_id and opened.created
    report_id = opened.id
    again, _job = moderation.report(member, 55)  # a repeat finds the open report
    assert (again.id, again.created) == (report_id, False)
    with pytest.raises(CommandError):
        moderation.review(member, report_id, "deleted")  # members may not decide
    review = moderation.review(admin(), report_id, "deleted")
    assert review is not None and review.delete_messages == [55]
    assert moderation.review(admin(), report_id, "banned") is None  # decided once
    assert intake.artifacts.keys(f"results/{job_id}/") == []
    press = ButtonPress(Action.RESEND, job_id=job_id)
    with pytest.raises(ButtonRefused):
        intake.to_resend(origin("8", 2), press, presser_is_admin=False)
    with pytest.raises(CommandError) as not_a_result:
        moderation.report(member, 999)
    assert not_a_result.value.key == "report.not_a_result"
    store.dispose()


def test_a_review_never_bans_a_bot_admin(world) -> None:  # type: ignore[no-untyped-def]
    intake, moderation, store, _ = world
    _done_job(intake, store, ADMIN)
    opened, _job = moderation.report(Actor("telegram", "5", Role.MEMBER, -100), 55)
    with pytest.raises(CommandError) as refused:
        moderation.review(admin(), opened.id, "banned")
    assert refused.value.key == "admin.cannot_ban_admin"
    assert not moderation.is_banned("telegram", ADMIN)
    # The report stays open (it was closed as "banned", with no one banned).
    review = moderation.review(admin(), opened.id, "dismissed")
    assert review is not None and review.report.status == "dismissed"
    store.dispose()


def test_a_review_ban_records_the_jobs_it_stopped(world) -> None:  # type: ignore[no-untyped-def]
    intake, moderation, store, _ = world
    _done_job(intake, store, "13")
    queued = intake.accept(origin("13", 2), parse_image_command(Command.PORTRAIT, "a boat"))
    opened, _job = moderation.report(Actor("telegram", "5", Role.MEMBER, -100), 55)
    assert moderation.review(admin(), opened.id, "banned") is not None
    assert moderation.is_banned("telegram", "13")
    with store.unit_of_work() as uow:
        [event] = [e for e in audit.latest(uow) if e.action == "review_banned"]
    assert event.detail == {
        "report": opened.id,
        "requester": "13",
        "cancelled_jobs": [queued.job_id],
    }
    store.dispose()


def test_pause_holds_the_hand_over_until_resume(world) -> None:  # type: ignore[no-untyped-def]
    intake, moderation, store, broker = world
    request = parse_image_command(Command.PORTRAIT, "a lake")
    ids = []
    for n in range(3):
        accepted = intake.accept(origin("9", n + 1), request)
        intake.dispatch(accepted)
        ids.append(accepted.job_id)
    moderation.pause(admin(), "maintenance")
    with pytest.raises(CommandError) as paused:
        intake.accept(origin("9", 10), request)
    assert (paused.value.key, paused.value.params) == ("service.paused", {"notice": "maintenance"})
    with store.unit_of_work() as uow:
        jobs.start_job(uow, ids[0], "w")
        jobs.complete_job(uow, ids[0], result_paths=[], result_file_ids=[], generation_seconds=0)
    intake.hand_over_held(ids[0])
    assert list(broker) == ids[:2]  # the held third waits while paused
    moderation.pause(admin(), None)
    assert intake.hand_over_all_held() == [ids[2]]
    store.dispose()


def test_a_limit_lowered_below_the_days_spending_shows_no_credits_left(world) -> None:  # type: ignore[no-untyped-def]
    intake, moderation, store, _ = world
    who = origin("12", 1)
    moderation.set_group_quota(admin(), 20)  # so that the group pays too
    intake.accept(who, parse_image_command(Command.PORTRAIT, "a market --n 4"))
    assert intake.quota_status(who).user_left <= 8
    moderation.set_quota(admin(), "12", 1)
    moderation.set_group_quota(admin(), 1)
    status = intake.quota_status(who)
    assert (status.user_left, status.user_limit) == (0, 1)
    assert (status.group_left, status.group_limit) == (0, 1)
    # /groupquota is recorded as a change of the group's settings, "off" included.
    moderation.set_group_quota(admin(), None)
    with store.unit_of_work() as uow:
        changes = [e.detail for e in audit.latest(uow) if e.action == "settings"]
    assert changes[:3] == [{"group_quota": "off"}, {"group_quota": 1}, {"group_quota": 20}]
    with pytest.raises(CommandError):
        moderation.set_group_quota(Actor("telegram", "12", Role.MEMBER, -100), 5)
    store.dispose()


def test_grant_and_setquota_change_what_a_user_may_spend(world) -> None:  # type: ignore[no-untyped-def]
    intake, moderation, store, _ = world
    who = origin("11", 1)
    moderation.grant(admin(), "11", 5)
    assert intake.quota_status(who).user_left == 15
    moderation.set_quota(admin(), "11", 30)
    status = intake.quota_status(who)
    assert (status.user_left, status.user_limit) == (35, 30)
    moderation.set_quota(admin(), "11", None)
    assert intake.quota_status(who).user_limit == 10
    with pytest.raises(CommandError) as not_admin:
        moderation.grant(Actor("telegram", "11", Role.GROUP_ADMIN, -100), "11", 5)
    assert not_admin.value.key == "admin.not_allowed"
    with store.unit_of_work() as uow:
        refused = [e for e in audit.latest(uow) if not e.allowed]
    assert refused[0].action == "grant" and refused[0].actor == "11"

    store.dispose()


def test_a_pause_notice_too_long_to_send_is_refused_and_nothing_is_paused(  # type: ignore[no-untyped-def]
    world,
) -> None:
    """Users get the notice inside a sentence of their own: at Telegram's 4096 characters the
    bot could tell them nothing, nor the admin that it paused."""
    _, moderation, store, _ = world
    with pytest.raises(CommandError) as refused:
        moderation.pause(admin(), "x" * (MAX_PAUSE_NOTICE_CHARS + 1))
    assert refused.value.key == "admin.pause_too_long"
    assert moderation.paused() is None
    moderation.pause(admin(), "y" * MAX_PAUSE_NOTICE_CHARS)
    assert moderation.paused() == "y" * MAX_PAUSE_NOTICE_CHARS
    store.dispose()


class FailingOnce(LocalArtifactStore):
    """Its first delete fails, as an object store that cannot be reached does."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failures = 1

    def delete_prefix(self, prefix: str) -> int:
        if self.failures:
            self.failures -= 1
            raise OSError("the object store cannot be reached")
        return super().delete_prefix(prefix)


def test_a_result_that_could_not_be_deleted_leaves_its_report_open(  # type: ignore[no-untyped-def]
    world, tmp_path: Path
) -> None:
    """ "Delete result" whose files stay stored must not close the report as deleted (no
    admin could decide it again): it stays open, and the next press deletes them."""
    intake, _, store, _ = world
    artifacts = FailingOnce(tmp_path)
    moderation = Moderation(Settings(data_dir=tmp_path, admin_ids=ADMIN), store, artifacts)
    job_id = _done_job(intake, store, "8")
    opened, _job = moderation.report(Actor("telegram", "5", Role.MEMBER, -100), 55)
    with pytest.raises(CommandError) as refused:
        moderation.review(admin(), opened.id, "deleted")
    assert refused.value.key == "report.delete_failed"
    with store.unit_of_work() as uow:
        report = audit.get_report(uow, opened.id)
        assert report is not None and (report.status, report.decided_by) == ("open", None)
    assert artifacts.keys(f"results/{job_id}/") != []
    review = moderation.review(admin(), opened.id, "deleted")
    assert review is not None and review.delete_messages == [55]
    assert artifacts.keys(f"results/{job_id}/") == []
    store.dispose()


def test_a_report_whose_requester_forgot_their_data_is_named_as_gone(  # type: ignore[no-untyped-def]
    world,
) -> None:
    """/forget deletes the reports on a user's jobs: the admin's card then says the report is
    gone and why, not that somebody already decided it."""
    intake, moderation, store, _ = world
    _done_job(intake, store, "8")
    opened, _job = moderation.report(Actor("telegram", "5", Role.MEMBER, -100), 55)
    privacy = PrivacyService(store, intake.artifacts, intake.media, ZoneInfo("UTC"))
    assert privacy.forget("telegram", "8").jobs == 1
    for decision in ("dismissed", "deleted", "banned"):
        with pytest.raises(CommandError) as gone:
            moderation.review(admin(), opened.id, decision)
        assert gone.value.key == "report.gone"
    store.dispose()
