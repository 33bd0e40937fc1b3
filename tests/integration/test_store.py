"""The store on real databases: SQLite and PostgreSQL (the `database_url` fixture runs each)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from chitrakar.artifacts import LocalArtifactStore
from chitrakar.config import Settings
from chitrakar.domain import (
    UNANSWERED_ABANDONED_AFTER_S,
    Command,
    GenerationOptions,
    GenerationPlan,
    ImageRequest,
    InvalidTransition,
    JobKind,
    JobStatus,
)
from chitrakar.media import MediaStore
from chitrakar.planning import Defaults, plan_request
from chitrakar.replies import quota_reply
from chitrakar.services import JobIntake
from chitrakar.styles import load_catalogue
from db import jobs
from db.jobs import Origin
from db.migrate import schema_is_current, upgrade_to_head
from db.models import Base, Job, User
from db.session import Store


def origin(user: str = "42", chat_id: int = 42, message_id: int = 7) -> Origin:
    return Origin(
        channel="telegram",
        chat_id=chat_id,
        chat_type="private",
        user_external_id=user,
        user_display_name="Asha",
        language="hi",
        request_message_id=message_id,
    )


def request(
    prompt: str = "a tea stall at dusk", **options: int
) -> tuple[ImageRequest, GenerationPlan]:
    req = ImageRequest(Command.PORTRAIT, prompt, GenerationOptions(**options))  # type: ignore[arg-type]
    plan = plan_request(
        req,
        None,
        avatar_prompt="",
        defaults=Defaults(base_size=512, steps=25, guidance_scale=7.0),
        rng=random.Random(1),
    )
    return req, plan


def test_migrations_create_exactly_the_models(database_url: str) -> None:
    assert not schema_is_current(database_url)
    upgrade_to_head(database_url)
    assert schema_is_current(database_url)
    store = Store(database_url)
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    store.dispose()
    assert differences == []


def test_a_started_job_names_its_own_requester(store: Store) -> None:
    """The view a worker starts from carries the requester of that job, among several."""
    _req, plan = request()
    with store.unit_of_work() as uow:
        ids = {
            user: jobs.take_in(uow, origin(user, message_id=n), JobKind.PORTRAIT, plan).job_id
            for n, user in enumerate(("61", "62", "63"), start=1)
        }
    for user in ("63", "61", "62"):
        with store.unit_of_work() as uow:
            view = jobs.start_job(uow, ids[user], "w")
        assert view is not None and view.requester == user


def test_ending_a_job_that_is_gone_says_so(store: Store) -> None:
    """Its user had everything deleted while the worker sent the result: the worker is
    told the job is gone (it then deletes the results), not that the move was invalid."""
    with store.unit_of_work() as uow, pytest.raises(jobs.JobNotFound):
        jobs.complete_job(uow, 404, result_paths=[], result_file_ids=[], generation_seconds=1.0)
    with store.unit_of_work() as uow, pytest.raises(jobs.JobNotFound):
        jobs.user_id_of(uow, 404)


def test_a_job_from_acceptance_to_done(store: Store) -> None:
    _req, plan = request(seed=5, images=2)
    with store.unit_of_work() as uow:
        job_id = jobs.take_in(
            uow, origin(), JobKind.PORTRAIT, plan, options={"seed": 5, "images": 2}
        ).job_id
        assert jobs.queue_position(uow, job_id) == 1
        jobs.attach_status_message(uow, job_id, 8)

    with store.unit_of_work() as uow:
        view = jobs.start_job(uow, job_id, "gpu-1:99")
    assert view is not None
    assert view.status == JobStatus.RUNNING
    assert view.plan.seeds == (5, 6)
    assert view.status_message_id == 8
    assert view.language == "hi"
    assert view.attempts == 1
    assert view.requester == origin().user_external_id
    # Built from the row the start returned: the same as the job read back, field by field.
    with store.unit_of_work() as uow:
        assert jobs.get_job(uow, job_id) == view

    with store.unit_of_work() as uow:
        jobs.complete_job(
            uow,
            job_id,
            result_paths=["a.png", "b.png"],
            result_file_ids=["x", "y"],
            generation_seconds=1.5,
        )
        # A task delivered twice finds the job ended and does nothing.
        assert jobs.start_job(uow, job_id, "gpu-2:1") is None
        assert jobs.fail_job(uow, job_id, "late") is None

    with store.unit_of_work() as uow:
        job = uow.session.get(Job, job_id)
        assert job is not None
        assert job.status == "done"
        assert job.result_file_ids == ["x", "y"]
        assert job.options == {"seed": 5, "images": 2}
        assert [e.status for e in job.events] == ["queued", "running", "done"]
        assert job.finished_at is not None and job.started_at is not None
    store.dispose()


def test_queue_position_counts_active_jobs_handed_over_ahead(store: Store) -> None:
    _req, plan = request()
    with store.unit_of_work() as uow:
        first, second, _held, fourth = (
            jobs.take_in(uow, origin(str(i), message_id=i), JobKind.PORTRAIT, plan).job_id
            for i in range(4)
        )
        for job_id in (first, second, fourth):
            assert jobs.claim_hand_over(uow, job_id, limit=2)
        jobs.start_job(uow, first, "w")
        # The third is held back (its user's flood, say): it is not ahead of the fourth.
        assert jobs.queue_position(uow, fourth) == 3
        jobs.fail_job(uow, second, "not queued")
        assert jobs.queue_position(uow, fourth) == 2
    store.dispose()


def test_a_queue_position_is_counted_from_the_index_alone(store: Store) -> None:
    """Every request counts the jobs ahead of it: with thousands queued, reading each one's
    row for its published_at tripled the count's cost (migration 0008). SQLite says how it
    would run the count; PostgreSQL's plan depends on its statistics."""
    if store.engine.dialect.name != "sqlite":
        pytest.skip("SQLite's query plan")
    with store.engine.connect() as connection:
        statement = jobs._AHEAD.params(job_id=1)
        sql = statement.compile(connection, compile_kwargs={"literal_binds": True})
        plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}").all()
    store.dispose()
    assert any("COVERING INDEX ix_jobs_status_id_published_at" in row[-1] for row in plan), plan


def test_a_job_is_taken_in_handed_over_while_its_user_has_a_place(store: Store) -> None:
    """take_in marks the hand-over in the transaction that writes the job: the first two of a
    user's jobs (limit 2), not the third; another user's job is not held by that flood."""
    _req, plan = request()
    with store.unit_of_work() as uow:
        taken = [
            jobs.take_in(uow, origin("5", message_id=n), JobKind.PORTRAIT, plan, hand_over_limit=2)
            for n in range(3)
        ]
        other = jobs.take_in(
            uow, origin("6", 6, message_id=9), JobKind.PORTRAIT, plan, hand_over_limit=2
        )
        assert [t.handed_over for t in taken] == [True, True, False]
        assert [t.position for t in taken] == [1, 2, 3]  # the held one: nothing after it
        assert (other.handed_over, other.position) == (True, 3)
        published = uow.session.scalars(
            select(Job.id).where(Job.published_at.is_not(None)).order_by(Job.id)
        ).all()
        assert published == [taken[0].job_id, taken[1].job_id, other.job_id]
        # Not marked without a limit: the job is recorded held.
        held = jobs.take_in(uow, origin("7", 7, message_id=1), JobKind.PORTRAIT, plan).job_id
        assert not jobs.is_handed_over(uow, held)
        # A place frees up when one of the user's jobs ends; the held one may then go.
        jobs.fail_job(uow, taken[0].job_id, "cancelled")
        assert jobs.claim_hand_over(uow, taken[2].job_id, limit=2)
        assert not jobs.claim_hand_over(uow, taken[2].job_id, limit=2)  # only once
    store.dispose()


def test_an_ended_job_cannot_be_completed_again(store: Store) -> None:
    _req, plan = request()
    with store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, origin(), JobKind.PORTRAIT, plan).job_id
        jobs.fail_job(uow, job_id, "broker down")
        with pytest.raises(InvalidTransition):
            jobs.complete_job(
                uow, job_id, result_paths=[], result_file_ids=[], generation_seconds=0
            )
    store.dispose()


def test_simultaneous_first_requests_of_a_new_user(store: Store) -> None:
    """A new user's first messages can arrive at once; each becomes a job, all for one user."""
    _req, plan = request()

    def submit(message_id: int) -> int:
        with store.unit_of_work() as uow:
            return jobs.take_in(
                uow, origin("new-user", message_id=message_id), JobKind.PORTRAIT, plan
            ).job_id

    with ThreadPoolExecutor(8) as pool:
        job_ids = list(pool.map(submit, range(16)))

    assert len(set(job_ids)) == 16
    with store.unit_of_work() as uow:
        assert uow.session.scalar(select(func.count()).select_from(User)) == 1
        assert uow.session.scalar(select(func.count()).select_from(Job)) == 16
    store.dispose()


def test_the_same_message_makes_one_job(store: Store) -> None:
    _req, plan = request()
    with store.unit_of_work() as uow:
        first = jobs.take_in(uow, origin(), JobKind.PORTRAIT, plan).job_id
        with pytest.raises(jobs.DuplicateRequest) as duplicate:
            jobs.take_in(uow, origin(), JobKind.PORTRAIT, plan)
        assert duplicate.value.job.id == first
        # Another message is a new job; so is each press of a button under the same message.
        other = Origin("telegram", 42, "private", "42", "Asha", "hi", request_message_id=8)
        assert jobs.take_in(uow, other, JobKind.PORTRAIT, plan).job_id != first
        presses = [
            Origin("telegram", 42, "private", "42", "Asha", "hi", 7, trigger=f"button:{n}")
            for n in (1, 2)
        ]
        pressed = {jobs.take_in(uow, press, JobKind.UPSCALE, plan).job_id for press in presses}
        assert len(pressed) == 2 and first not in pressed
        with pytest.raises(jobs.DuplicateRequest):
            jobs.take_in(uow, presses[0], JobKind.UPSCALE, plan)
        with pytest.raises(ValueError, match="needs a message id or a trigger"):
            jobs.take_in(
                uow,
                Origin("telegram", 42, "private", "42", "A", "hi", None),
                JobKind.PORTRAIT,
                plan,
            )
    store.dispose()


def test_the_same_message_offered_at_once_makes_one_job(store: Store) -> None:
    _req, plan = request()

    def submit(_: int) -> tuple[str, int]:
        with store.unit_of_work() as uow:
            try:
                return "created", jobs.take_in(uow, origin("twice"), JobKind.PORTRAIT, plan).job_id
            except jobs.DuplicateRequest as duplicate:
                return "duplicate", duplicate.job.id

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(submit, range(8)))

    assert sorted(kind for kind, _ in outcomes) == ["created"] + ["duplicate"] * 7
    assert len({job_id for _, job_id in outcomes}) == 1
    store.dispose()


def test_migration_0002_keeps_the_oldest_job_of_a_repeated_message(database_url: str) -> None:
    """Before 0002 an edited command could make a second job for one message."""
    from alembic import command
    from sqlalchemy import text

    from db.migrate import alembic_config

    command.upgrade(alembic_config(database_url), "0001")
    store = Store(database_url)
    with store.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO users (id, channel, external_id, language, created_at) "
                "VALUES (1, 'telegram', '42', 'en', CURRENT_TIMESTAMP)"
            )
        )
        for job_id, message_id in ((1, 7), (2, 7), (3, 8), (4, 7)):
            connection.execute(
                text(
                    "INSERT INTO jobs (id, user_id, channel, chat_id, chat_type, "
                    "request_message_id, language, command, prompt, options, width, height, "
                    "steps, guidance_scale, seeds, status, attempts, created_at) VALUES "
                    "(:id, 1, 'telegram', 42, 'private', :message, 'en', 'portrait', 'p', "
                    "'{}', 64, 64, 4, 7.0, '[1]', 'done', 1, CURRENT_TIMESTAMP)"
                ),
                {"id": job_id, "message": message_id},
            )
            connection.execute(
                text(
                    "INSERT INTO job_events (job_id, status, at) "
                    "VALUES (:id, 'queued', CURRENT_TIMESTAMP)"
                ),
                {"id": job_id},
            )
    upgrade_to_head(database_url)
    with store.engine.connect() as connection:
        rows = connection.execute(text("SELECT id, request_message_id FROM jobs ORDER BY id"))
        assert [tuple(row) for row in rows] == [(1, 7), (2, None), (3, 8), (4, None)]
        # 0003: each job keeps its trigger, and rebuilding the table on SQLite kept the events.
        rows = connection.execute(text("SELECT id, trigger FROM jobs ORDER BY id"))
        assert [tuple(row) for row in rows] == [
            (1, "message:7"),
            (2, "job:2"),
            (3, "message:8"),
            (4, "job:4"),
        ]
        events = connection.execute(text("SELECT COUNT(*) FROM job_events")).scalar()
        assert events == 4
    store.dispose()


def job_intake(store: Store, settings: Settings, published: list[int]) -> JobIntake:
    """The bot's intake on this store; what it publishes is appended to `published`."""
    return JobIntake(
        settings,
        store,
        published.append,
        load_catalogue(),
        MediaStore(settings.media_dir),
        LocalArtifactStore(settings.resolved_data_dir),
    )


def test_a_few_step_preset_charges_for_the_steps_it_runs(store: Store, tmp_path: Path) -> None:
    """`--steps 40` costs double, but a worker on a 4-step preset runs 4 whatever is asked:
    the user pays for one image, not for steps that never run."""
    req, _ = request(steps=40)
    for preset, message_id, left in [("fast", 1, 3), ("lightning", 2, 2), ("auto", 3, 0)]:
        settings = Settings(image_size=64, data_dir=tmp_path, daily_quota=5, preset=preset)
        job_intake(store, settings, []).accept(origin(message_id=message_id), req)
        status = job_intake(store, settings, []).quota_status(origin())
        assert status.user_left == left, preset
        # /quota says so, instead of "2 above 30 steps".
        reply = quota_reply("en", status, "UTC")
        assert ("every image takes 4 steps" in reply) == (preset == "lightning"), reply
        assert ("above 30 steps" in reply) == (preset != "lightning"), reply
    store.dispose()


def test_an_unreadable_presets_file_leaves_the_bot_charging_the_steps_asked_for(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "presets.toml"
    broken.write_text("[presets.x\n")
    settings = Settings(image_size=64, data_dir=tmp_path, daily_quota=5, presets_file=broken)
    job_intake(store, settings, []).accept(origin(), request(steps=40)[0])
    assert job_intake(store, settings, []).quota_status(origin()).user_left == 3
    assert "jobs are charged for the steps they ask for" in caplog.text
    store.dispose()


def two_in_flight(data_dir: Path) -> Settings:
    return Settings(
        image_size=64, default_steps=4, data_dir=data_dir, daily_quota=5, max_jobs_in_flight=2
    )


def test_a_repeat_of_a_request_never_answered_is_answered_and_published(
    store: Store, tmp_path: Path
) -> None:
    """The bot stopped after recording a job but before answering and publishing it; when
    Telegram offers the update again, the job is answered and published then."""
    published: list[int] = []
    intake = job_intake(
        store, Settings(image_size=64, default_steps=4, data_dir=tmp_path), published
    )
    req, _ = request()
    first = intake.accept(origin(), req)  # ... and the process stopped here
    soon = intake.accept(origin(), req)  # a repeat at once: the first is still being handled
    assert (soon.job_id, soon.duplicate) == (first.job_id, True)
    with store.unit_of_work() as uow:  # time passes
        job = uow.session.get(Job, first.job_id)
        assert job is not None
        job.created_at = job.created_at - timedelta(seconds=UNANSWERED_ABANDONED_AFTER_S + 1)
        uow.commit()
    again = intake.accept(origin(), req)
    assert (again.job_id, again.duplicate) == (first.job_id, False)
    intake.attach_status_message(again.job_id, 99)
    assert intake.dispatch(again)
    assert published == [first.job_id]

    third = intake.accept(origin(), req)  # answered now: a later repeat is a duplicate
    assert (third.job_id, third.duplicate) == (first.job_id, True)
    assert published == [first.job_id]
    store.dispose()


def test_a_request_asked_again_after_its_intake_failed_is_answered_once_and_charged_once(
    store: Store, tmp_path: Path
) -> None:
    """The bot asked, the job was written, and the answer never came back (the intake process
    died with it in hand): asked again, in a batch with a request not yet written, both are
    answered and published, the first's job not made twice nor charged twice."""
    from chitrakar.services import Accepted

    published: list[int] = []
    intake = job_intake(store, two_in_flight(tmp_path), published)
    req, _ = request()
    written = intake.accept(origin(message_id=1), req)  # ... and its answer was lost
    before = intake.quota_status(origin()).user_left
    again, new = intake.accept_many(
        [(origin(message_id=1), req), (origin(message_id=2), req)], asked_before=True
    )
    assert isinstance(again, Accepted) and isinstance(new, Accepted)
    assert (again.job_id, again.duplicate, again.handed_over) == (written.job_id, False, True)
    assert new.job_id != written.job_id and not new.duplicate
    assert intake.quota_status(origin()).user_left == before - 1  # the new one's credit alone
    assert intake.dispatch_many([again, new]) == [True, True]
    assert published == [written.job_id, new.job_id]

    # Once answered, it is somebody's: asked again, it is a duplicate.
    intake.attach_status_message(written.job_id, 99)
    [answered] = intake.accept_many([(origin(message_id=1), req)], asked_before=True)
    assert isinstance(answered, Accepted) and answered.duplicate
    store.dispose()


def test_an_avatar_asked_again_after_its_intake_failed_takes_the_new_selfie(
    store: Store, tmp_path: Path
) -> None:
    """The avatar's job was written, but its intake failed (the connection dropped after
    COMMIT) and deleted the selfie: asked again, the job takes the new selfie, not the
    deleted one its worker would fail on. Asked by anyone else, it stays a duplicate."""
    from PIL import Image

    from chitrakar.domain import parse_image_command

    settings = two_in_flight(tmp_path)
    published: list[int] = []
    intake = job_intake(store, settings, published)
    req = parse_image_command(Command.AVATAR, "anime")

    def input_of(job_id: int) -> str | None:
        with store.unit_of_work() as uow:
            view = jobs.get_job(uow, job_id)
            assert view is not None
            return view.input_path

    def inputs() -> set[Path]:
        return set((settings.media_dir / "inputs").iterdir())

    written = intake.accept(origin(message_id=1), req, Image.new("RGB", (64, 64), "tan"))
    first = input_of(written.job_id)
    assert first is not None
    Path(first).unlink()  # what the failed first asking's intake did

    # Asked by another delivery of the update: a duplicate; its selfie is deleted.
    repeated = intake.accept(origin(message_id=1), req, Image.new("RGB", (64, 64), "tan"))
    assert (repeated.job_id, repeated.duplicate) == (written.job_id, True)
    assert input_of(written.job_id) == first and inputs() == set()

    # Asked again by the bot that asked first: the job takes the new selfie, and is answered.
    again = intake.accept(
        origin(message_id=1), req, Image.new("RGB", (64, 64), "olive"), asked_before=True
    )
    assert (again.job_id, again.duplicate) == (written.job_id, False)
    second = input_of(written.job_id)
    assert second is not None and second != first
    assert inputs() == {Path(second)}

    # Its selfie there, asked again once more: that selfie is kept, the new one deleted.
    once_more = intake.accept(
        origin(message_id=1), req, Image.new("RGB", (64, 64), "teal"), asked_before=True
    )
    assert once_more.job_id == written.job_id
    assert input_of(written.job_id) == second and inputs() == {Path(second)}
    store.dispose()


def test_the_id_of_a_deleted_job_is_never_given_again(store: Store) -> None:
    """After /forget deletes someone's newest job, an old button or a worker holding its id
    must not reach a new job of someone else."""
    _, plan = request()
    with store.unit_of_work() as uow:
        first = jobs.take_in(uow, origin(message_id=1), JobKind.PORTRAIT, plan).job_id
        gone = uow.session.get(Job, first)
        assert gone is not None
        uow.session.delete(gone)
        uow.commit()
        second = jobs.take_in(uow, origin(message_id=2), JobKind.PORTRAIT, plan).job_id
    assert second > first
    store.dispose()
