"""The intake's calls for commands that arrived together (the bot makes each once for all the
commands of one turn of its event loop): each request hears its own outcome, on SQLite and
PostgreSQL, and a broker that refuses a batch leaves no job waiting for a message that never
came."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from chitrakar.artifacts import LocalArtifactStore
from chitrakar.config import Settings
from chitrakar.domain import Command, CommandError, ImageRequest, JobStatus, parse_image_command
from chitrakar.media import MediaStore
from chitrakar.moderation import Moderation
from chitrakar.quota import Account, QuotaExceeded
from chitrakar.safety import PromptBlocked
from chitrakar.services import Accepted, JobIntake
from chitrakar.styles import load_catalogue
from db import audit, jobs, ledger
from db.jobs import Origin
from db.session import Store


def origin(user: str, message_id: int) -> Origin:
    return Origin("telegram", int(user), "private", user, user, "en", message_id)


def intake_on(
    store: Store,
    tmp_path: Path,
    published: list[list[int]],
    refuse: bool = False,
    refuse_batches: bool = False,
    refuse_job: int | None = None,
) -> JobIntake:
    """`refuse`: the broker refuses everything; `refuse_batches`: every batch (a lone job gets
    through, except `refuse_job`)."""

    def publish_many(job_ids: Sequence[int]) -> None:
        if refuse or (refuse_batches and len(job_ids) > 1) or refuse_job in job_ids:
            raise ConnectionError("broker gone")
        published.append(list(job_ids))

    settings = Settings(
        image_size=64, default_steps=4, data_dir=tmp_path, daily_quota=2, max_jobs_in_flight=1
    )
    return JobIntake(
        settings,
        store,
        lambda job_id: publish_many([job_id]),
        load_catalogue(),
        MediaStore(settings.media_dir),
        LocalArtifactStore(tmp_path),
        publish_many=publish_many,
    )


def portrait(words: str = "a lighthouse at dawn") -> ImageRequest:
    return parse_image_command(Command.PORTRAIT, words)


def test_requests_taken_in_together_each_hear_their_own_outcome(
    store: Store, tmp_path: Path
) -> None:
    published: list[list[int]] = []
    intake = intake_on(store, tmp_path, published)
    outcomes = intake.accept_many(
        [
            (origin("1", 1), portrait()),
            (origin("2", 1), portrait("a nude woman on a beach")),  # refused by the lists
            (origin("3", 1), portrait()),
            (origin("3", 2), portrait()),  # held: one job in flight a user
            (origin("3", 3), portrait()),  # two credits a day
            (origin("1", 1), portrait()),  # user 1's first, offered twice
        ]
    )
    first, blocked, third, held, short, repeat = outcomes
    assert isinstance(first, Accepted) and first.handed_over and not first.duplicate
    assert isinstance(blocked, PromptBlocked)
    assert isinstance(third, Accepted) and third.handed_over
    assert isinstance(held, Accepted) and not held.handed_over
    assert isinstance(short, QuotaExceeded)
    assert isinstance(repeat, Accepted) and repeat.duplicate and repeat.job_id == first.job_id
    # One refused request costs no other its job, its credits or its record.
    with store.unit_of_work() as uow:
        assert jobs.get_job(uow, first.job_id).status == JobStatus.QUEUED
        assert jobs.get_job(uow, third.job_id).status == JobStatus.QUEUED
        user_3 = Account("user:telegram:3", 2)
        assert ledger.balance(uow.session, user_3, intake.quota_day()) == 0
        assert [entry.action for entry in audit.latest(uow)] == ["prompt_blocked"]

    dispatched = intake.dispatch_many([first, held, third])
    assert dispatched == [True, True, True]
    assert published == [[first.job_id, third.job_id]]  # one publish for the batch

    assert intake.attach_status_messages([(first.job_id, 11), (third.job_id, 33)]) == [True, True]
    with store.unit_of_work() as uow:
        jobs.cancel_jobs(uow, "telegram", None, "3")
    # Ended: no worker will look for its message, so the caller is told to remove it.
    assert intake.attach_status_messages([(first.job_id, 12), (third.job_id, 34)]) == [True, False]
    with store.unit_of_work() as uow:
        assert jobs.get_job(uow, first.job_id).status_message_id == 12


def test_requests_taken_in_together_are_committed_once(store: Store, tmp_path: Path) -> None:
    """When none of them is refused there, a batch's requests are written in one transaction:
    one commit (on SQLite, one write to disk) for all of them, with the places in line and
    hand-overs that one transaction each would give."""
    intake = intake_on(store, tmp_path, [])
    commits: list[str] = []
    event.listen(store.engine, "commit", lambda _: commits.append("commit"))
    outcomes = intake.accept_many(
        [
            (origin("40", 1), portrait()),
            (origin("41", 1), portrait()),
            (origin("41", 2), portrait()),  # held: one job in flight a user
            (origin("42", 1), portrait()),
        ]
    )
    assert len(commits) == 1
    assert all(isinstance(one, Accepted) for one in outcomes)
    first, second, _held, third = outcomes
    assert [one.handed_over for one in outcomes] == [True, True, False, True]  # type: ignore[union-attr]
    assert (first.position, second.position, third.position) == (1, 2, 3)  # type: ignore[union-attr]
    with store.unit_of_work() as uow:
        for one in outcomes:
            assert jobs.get_job(uow, one.job_id).status == JobStatus.QUEUED  # type: ignore[union-attr]
        user_41 = Account("user:telegram:41", 2)
        assert ledger.balance(uow.session, user_41, intake.quota_day()) == 0  # both reserved

    # One refused in the batch's transaction (its message came twice): the others are
    # taken in one by one, each in a transaction of its own.
    commits.clear()
    outcomes = intake.accept_many(
        [
            (origin("43", 1), portrait()),
            (origin("40", 1), portrait()),
            (origin("44", 1), portrait()),
        ]
    )
    fourth, repeat, fifth = outcomes
    assert isinstance(repeat, Accepted) and repeat.duplicate and repeat.job_id == first.job_id  # type: ignore[union-attr]
    assert isinstance(fourth, Accepted) and isinstance(fifth, Accepted)
    assert (fourth.position, fifth.position) == (4, 5)
    assert len(commits) == 2


def test_a_batch_whose_commit_fails_fails_for_every_request(store: Store, tmp_path: Path) -> None:
    """Whether a commit that failed was written cannot be known: its requests are not taken
    in again (each would find itself already there, and its user would hear nothing), and
    every caller hears of the failure."""
    intake = intake_on(store, tmp_path, [])
    failures = iter([OperationalError("COMMIT", {}, Exception("disk I/O error"))])

    def fail_once(_: object) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure

    event.listen(store.engine, "commit", fail_once)
    with pytest.raises(OperationalError):
        intake.accept_many([(origin("50", 1), portrait()), (origin("51", 1), portrait())])
    with store.unit_of_work() as uow:
        assert jobs.active_job_ids(uow) == []


def test_two_batches_sharing_users_at_once_do_not_deadlock(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On PostgreSQL, each batch locks its users and accounts first, in key order. Taken as
    the requests came, the first batch would hold user 60 and wait for 61 while the second
    held 61 and waited for 60: PostgreSQL would break that after a second, and one batch would
    be taken in again one by one. Each thread here pauses after its first user's lock, so
    that the two are sure to overlap."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's one write lock admits one writing transaction at a time")
    intake = intake_on(store, tmp_path, [])
    paused: set[int] = set()

    def pause_after_first_user(*args: object) -> None:
        statement = str(args[2])
        if statement.startswith("INSERT INTO users") and threading.get_ident() not in paused:
            paused.add(threading.get_ident())
            time.sleep(1.0)  # ample for the other thread to take its first lock

    event.listen(store.engine, "after_cursor_execute", pause_after_first_user)
    batches = [
        [(origin("60", 1), portrait()), (origin("61", 1), portrait())],
        [(origin("61", 2), portrait()), (origin("60", 2), portrait())],
    ]
    with caplog.at_level(logging.INFO, logger="chitrakar.services"), ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(intake.accept_many, batches))
    assert all(isinstance(one, Accepted) for batch in outcomes for one in batch), outcomes
    assert "accepted" in caplog.text  # the log is heard
    assert "one by one" not in caplog.text


def _second_refused(
    store: Store, tmp_path: Path, users: Sequence[str], published: list[list[int]]
) -> tuple[list[Accepted], JobIntake]:
    """A portrait from each user, taken in; and an intake whose broker refuses every batch,
    and the second job even alone."""
    outcomes = intake_on(store, tmp_path, []).accept_many(
        [(origin(user, 1), portrait()) for user in users]
    )
    accepted = [one for one in outcomes if isinstance(one, Accepted)]
    assert len(accepted) == len(users)
    refused = accepted[1].job_id
    return accepted, intake_on(store, tmp_path, published, refuse_batches=True, refuse_job=refused)


def test_a_batch_the_broker_refuses_is_published_one_job_at_a_time(
    store: Store, tmp_path: Path
) -> None:
    """A batch is sent once; when it fails, each job is published on its own (with the broker
    client's retries), and only a job the broker still refuses is failed and refunded."""
    published: list[list[int]] = []
    accepted, intake = _second_refused(store, tmp_path, ("30", "31", "32"), published)
    assert intake.dispatch_many(accepted) == [True, False, True]
    assert published == [[accepted[0].job_id], [accepted[2].job_id]]
    with store.unit_of_work() as uow:
        statuses = [jobs.get_job(uow, one.job_id).status for one in accepted]  # type: ignore[union-attr]
        assert statuses == [JobStatus.QUEUED, JobStatus.FAILED, JobStatus.QUEUED]
        assert ledger.balance(uow.session, Account("user:telegram:31", 2), intake.quota_day()) == 2


def test_a_refused_job_whose_failure_cannot_be_recorded_fails_no_other_job(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker refuses one job and the database its failure: the jobs after it are still
    published, and it stays queued, handed over, for the reconciler to publish again."""
    published: list[list[int]] = []
    accepted, intake = _second_refused(store, tmp_path, ("40", "41", "42"), published)
    refused = accepted[1].job_id

    def database_away(*args: object, **kwargs: object) -> None:
        raise OperationalError("UPDATE jobs", {}, Exception("the connection was lost"))

    monkeypatch.setattr(jobs, "fail_job", database_away)
    assert intake.dispatch_many(accepted) == [True, True, True]
    assert published == [[accepted[0].job_id], [accepted[2].job_id]]
    with store.unit_of_work() as uow:
        job = jobs.get_job(uow, refused)
        assert job is not None and job.status == JobStatus.QUEUED


def test_a_job_the_broker_refuses_is_failed_and_refunded(store: Store, tmp_path: Path) -> None:
    intake = intake_on(store, tmp_path, [], refuse=True)
    accepted = intake.accept_many([(origin("5", 1), portrait()), (origin("6", 1), portrait())])
    assert all(isinstance(one, Accepted) for one in accepted)
    assert intake.dispatch_many(accepted) == [False, False]  # type: ignore[arg-type]
    with store.unit_of_work() as uow:
        for one in accepted:
            job = jobs.get_job(uow, one.job_id)  # type: ignore[union-attr]
            assert job.status == JobStatus.FAILED
        user_5 = Account("user:telegram:5", 2)
        assert ledger.balance(uow.session, user_5, intake.quota_day()) == 2  # refunded


def test_the_banned_among_several_users_are_found_in_one_call(store: Store, tmp_path: Path) -> None:
    intake = intake_on(store, tmp_path, [])
    for user in ("7", "8"):
        intake.accept(origin(user, 1), portrait())
    moderation = Moderation(Settings(data_dir=tmp_path), store, LocalArtifactStore(tmp_path))
    with store.unit_of_work() as uow:
        audit.set_banned(uow, "telegram", "8", True)
    assert moderation.are_banned("telegram", ["7", "8", "9", "8"]) == [False, True, False, True]
    assert moderation.are_banned("web", ["8"]) == [False]


def group(user: str, chat_id: int, message_id: int) -> Origin:
    return Origin("telegram", chat_id, "group", user, user, "en", message_id)


def test_checks_read_together_see_each_requests_own_chat_user_and_accounts(
    store: Store, tmp_path: Path
) -> None:
    intake = intake_on(store, tmp_path, [])
    with store.unit_of_work() as uow:
        audit.update_chat_settings(uow, "telegram", -100, command=(Command.PORTRAIT, False))
        audit.update_chat_settings(uow, "telegram", -300, style=("madhubani", False))
    with store.unit_of_work() as uow:
        ledger.set_account_limit(uow.session, "group:telegram:-200", 0)  # its /groupquota 0
        ledger.set_account_limit(uow.session, "user:telegram:21", 0)  # an admin's /setquota
        uow.commit()
    intake.set_default_style(origin("22", 1), "madhubani")
    outcomes = intake.accept_many(
        [
            (group("20", -100, 1), portrait()),  # /portrait is off in this group
            (group("20", -200, 2), portrait()),  # this group's credits are spent
            (origin("21", 1), portrait()),  # this user's own limit is 0
            (origin("22", 2), portrait()),  # this user chose a default style
            # ... which this group switched off: left aside there, as they did not ask for it
            (group("22", -300, 3), portrait()),
            (group("22", -300, 5), portrait("a kite --style madhubani")),  # asked: refused
            (group("23", -300, 4), portrait()),  # another user, the same group: fine
        ]
    )
    command_off, group_short, user_short, styled, default_off, style_off, plain = outcomes
    assert isinstance(command_off, CommandError) and command_off.key == "settings.command_off"
    assert isinstance(group_short, QuotaExceeded) and group_short.key == "quota.exceeded_group"
    assert isinstance(user_short, QuotaExceeded) and user_short.key == "quota.exceeded"
    assert isinstance(style_off, CommandError) and style_off.key == "settings.style_off"
    assert isinstance(styled, Accepted) and isinstance(plain, Accepted)
    assert isinstance(default_off, Accepted)
    with store.unit_of_work() as uow:
        assert jobs.get_job(uow, styled.job_id).plan.style == "madhubani"  # type: ignore[union-attr]
        assert jobs.get_job(uow, default_off.job_id).plan.style is None  # type: ignore[union-attr]
        assert jobs.get_job(uow, plain.job_id).plan.style is None  # type: ignore[union-attr]
