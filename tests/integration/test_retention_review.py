"""Retention on real databases, for what a review found it missed: the images of a job that
failed before naming them, a result a queued variation still needs, and job ids kept unique
when the schema goes down past 0007 and up again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from alembic import command
from sqlalchemy import select

from chitrakar.artifacts import LocalArtifactStore
from chitrakar.config import Settings
from chitrakar.domain import GenerationPlan, JobKind, JobStatus
from chitrakar.media import MediaStore
from chitrakar.retention import SweepReport, sweep
from db import jobs
from db.jobs import Origin
from db.migrate import alembic_config, upgrade_to_head
from db.models import Job, JobEvent
from db.session import Store
from tests.integration.test_retention import finished_job

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PLAN = GenerationPlan("p", 64, 64, 4, (1,), 7.0, strength=0.5)
KEPT = timedelta(days=30)


def origin(message_id: int) -> Origin:
    return Origin("telegram", 42, "private", "42", "Asha", "en", message_id)


def settings_in(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, retention_days=KEPT.days, input_retention_hours=24)


def stores(tmp_path: Path) -> tuple[LocalArtifactStore, MediaStore]:
    return LocalArtifactStore(tmp_path / "artifacts"), MediaStore(tmp_path / "media")


def ended_at(store: Store, job_id: int, moment: datetime) -> None:
    with store.unit_of_work() as uow:
        job = uow.session.get(Job, job_id)
        assert job is not None
        job.finished_at = moment
        uow.commit()


def stored_then_failed(
    store: Store, artifacts: LocalArtifactStore, message_id: int, ended: datetime
) -> int:
    """A job whose worker stored its images (`_save`) and then failed before naming them on
    the job (the content check or the database failed, or the worker died and a later
    attempt was given up)."""
    with store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, origin(message_id), JobKind.PORTRAIT, PLAN).job_id
        jobs.start_job(uow, job_id, "w")
    artifacts.put(f"results/{job_id}/0-1.png", b"stored, never named")
    with store.unit_of_work() as uow:
        assert jobs.fail_job(uow, job_id, "RuntimeError: the classifier crashed") is not None
    ended_at(store, job_id, ended)
    return job_id


def test_the_images_of_a_job_that_failed_before_naming_them_go_when_due(
    store: Store, tmp_path: Path
) -> None:
    artifacts, media = stores(tmp_path)
    old = stored_then_failed(store, artifacts, 1, NOW - KEPT - timedelta(minutes=1))
    recent = stored_then_failed(store, artifacts, 2, NOW - KEPT + timedelta(minutes=1))
    # A job still running has stored its images and not named them yet: they stay.
    with store.unit_of_work() as uow:
        running = jobs.take_in(uow, origin(3), JobKind.PORTRAIT, PLAN).job_id
        jobs.start_job(uow, running, "w")
    artifacts.put(f"results/{running}/0-1.png", b"being checked")

    report = sweep(settings_in(tmp_path), store, artifacts, media, NOW)

    assert report == SweepReport(results=1)
    assert not artifacts.keys(f"results/{old}/")
    assert artifacts.keys(f"results/{recent}/") and artifacts.keys(f"results/{running}/")
    with store.unit_of_work() as uow:
        job = uow.session.get(Job, old)
        assert job is not None and job.status == JobStatus.FAILED  # its history stays
    assert sweep(settings_in(tmp_path), store, artifacts, media, NOW) == SweepReport()
    store.dispose()


def test_a_result_a_queued_variation_starts_from_stays_until_it_ends(
    store: Store, tmp_path: Path
) -> None:
    """The press was accepted because the result existed; the sweep must not take it from
    the variation while it waits for a worker."""
    artifacts, media = stores(tmp_path)
    parent = finished_job(store, artifacts, 1, NOW - KEPT - timedelta(minutes=1))
    with store.unit_of_work() as uow:
        child = jobs.take_in(
            uow, origin(2), JobKind.VARIATION, PLAN, parent_job_id=parent, parent_index=0
        ).job_id

    assert sweep(settings_in(tmp_path), store, artifacts, media, NOW) == SweepReport()
    assert artifacts.keys(f"results/{parent}/")
    with store.unit_of_work() as uow:
        kept = uow.session.get(Job, parent)
        assert kept is not None and kept.result_paths == [f"results/{parent}/0-1.png"]
        jobs.start_job(uow, child, "w")
    assert sweep(settings_in(tmp_path), store, artifacts, media, NOW) == SweepReport()
    assert artifacts.keys(f"results/{parent}/")  # still needed while it runs

    with store.unit_of_work() as uow:
        jobs.fail_job(uow, child, "RuntimeError: out of memory")
    assert sweep(settings_in(tmp_path), store, artifacts, media, NOW) == SweepReport(results=1)
    assert not artifacts.keys(f"results/{parent}/")
    with store.unit_of_work() as uow:
        details = uow.session.scalars(select(JobEvent.detail).where(JobEvent.job_id == parent))
        assert "results deleted (retention)" in list(details)
    store.dispose()


def test_job_ids_are_never_given_again_after_going_down_past_0007(database_url: str) -> None:
    """0007's downgrade rebuilds `jobs` on SQLite: with AUTOINCREMENT, as 0004 made it."""
    upgrade_to_head(database_url)
    command.downgrade(alembic_config(database_url), "0006")
    upgrade_to_head(database_url)
    store = Store(database_url)
    with store.unit_of_work() as uow:
        first = jobs.take_in(uow, origin(1), JobKind.PORTRAIT, PLAN).job_id
        gone = uow.session.get(Job, first)
        assert gone is not None
        uow.session.delete(gone)
        uow.commit()
        second = jobs.take_in(uow, origin(2), JobKind.PORTRAIT, PLAN).job_id
    assert second > first
    store.dispose()
