"""Export and erasure of a user's data on real databases (SQLite and PostgreSQL): the export
holds everything stored about the user and nothing of anyone else; after forgetting, no row
of any table mentions them and their files are gone, while the other user's data is intact."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from PIL import Image
from sqlalchemy import String, func, or_, select
from sqlalchemy import text as sql

from chitrakar.artifacts import LocalArtifactStore
from chitrakar.domain import GenerationPlan, JobKind, JobStatus
from chitrakar.media import MediaStore
from chitrakar.privacy import ForgetReport, PrivacyService
from chitrakar.quota import Account, quota_day
from db import audit, jobs, ledger, retention
from db.jobs import Charge, Origin
from db.migrate import upgrade_to_head
from db.models import Account as AccountRow
from db.models import Base, Job, LedgerEntry, Report, User
from db.session import Store

DAY = date(2026, 11, 26)
ZONE = ZoneInfo("Asia/Kolkata")
GROUP = -100
A, B = "42", "43"
A_KEY, B_KEY, GROUP_KEY = "user:telegram:42", "user:telegram:43", "group:telegram:-100"
README = "What is in this archive (the caller's translated text)."
PLAN = GenerationPlan("a crowded market", 64, 64, 4, (1,), 7.0)


@dataclass
class World:
    store: Store
    artifacts: LocalArtifactStore
    media: MediaStore
    service: PrivacyService
    tmp: Path
    job_ids: dict[str, list[int]] = field(default_factory=lambda: {A: [], B: []})
    result_keys: dict[str, list[str]] = field(default_factory=lambda: {A: [], B: []})
    selfies: dict[str, str] = field(default_factory=dict)
    legacy_path: Path | None = None
    next_message: int = 1

    def origin(self, user: str, chat_id: int) -> Origin:
        self.next_message += 1
        chat_type = "private" if chat_id > 0 else "group"
        return Origin("telegram", chat_id, chat_type, user, f"user {user}", "en", self.next_message)

    def charge(self, user: str, chat_id: int) -> Charge:
        accounts = [Account(f"user:telegram:{user}", 100)]
        if chat_id < 0:
            accounts.append(Account(GROUP_KEY, 50))
        return Charge(tuple(accounts), 2, DAY)

    def job(
        self,
        user: str,
        prompt: str,
        *,
        chat_id: int = GROUP,
        kind: JobKind = JobKind.PORTRAIT,
        images: int = 1,
        input_path: str | None = None,
        parent: int | None = None,
        outcome: str = "done",
    ) -> int:
        plan = GenerationPlan(prompt, 64, 64, 4, tuple(range(1, images + 1)), 7.0)
        with self.store.unit_of_work() as uow:
            job_id = jobs.take_in(
                uow,
                self.origin(user, chat_id),
                kind,
                plan,
                options={"images": images},
                input_path=input_path,
                parent_job_id=parent,
                parent_index=0 if parent is not None else None,
                charge=self.charge(user, chat_id),
            ).job_id
            jobs.start_job(uow, job_id, "worker-1")
            if outcome == "failed":
                jobs.fail_job(uow, job_id, "RuntimeError: out of memory")
            elif outcome == "legacy":
                # A row from before the artifact store: an absolute path, no checksum.
                self.legacy_path = self.tmp / "old-results" / str(job_id) / "0-1.png"
                self.legacy_path.parent.mkdir(parents=True)
                self.legacy_path.write_bytes(b"legacy png of " + user.encode())
                jobs.complete_job(
                    uow,
                    job_id,
                    result_paths=[str(self.legacy_path)],
                    result_file_ids=["legacy-file-id"],
                    generation_seconds=1.0,
                )
            else:
                stored = [
                    self.artifacts.put(
                        f"results/{job_id}/{i}-{seed}.png", f"png {user} {job_id} {i}".encode()
                    )
                    for i, seed in enumerate(plan.seeds)
                ]
                jobs.complete_job(
                    uow,
                    job_id,
                    result_paths=[s.key for s in stored],
                    result_checksums=[s.sha256 for s in stored],
                    result_file_ids=[f"file-{job_id}-{i}" for i in range(len(stored))],
                    generation_seconds=2.5,
                )
                self.result_keys[user] += [s.key for s in stored]
        self.job_ids[user].append(job_id)
        return job_id

    def selfie(self, user: str, colour: str) -> str:
        path = self.media.save_input(Image.new("RGB", (8, 8), colour))
        self.selfies[user] = path
        return path


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> World:
    upgrade_to_head(database_url)
    store = Store(database_url)
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    media = MediaStore(tmp_path / "media")
    w = World(store, artifacts, media, PrivacyService(store, artifacts, media, ZONE), tmp_path)

    a_group = w.job(A, "a tea stall at dusk", images=2)
    w.job(A, "a kite over the river", chat_id=42, outcome="failed")
    a_avatar = w.job(A, "A's avatar", kind=JobKind.AVATAR, input_path=w.selfie(A, "red"))
    w.job(A, "an old portrait", chat_id=42, outcome="legacy")

    w.job(B, "a lighthouse in monsoon rain")
    # B, an admin of the group, presses buttons under A's results there: a variation of A's
    # image and Again under A's avatar (which reuses A's selfie: it stays A's).
    w.job(B, "B's variation of the tea stall", kind=JobKind.VARIATION, parent=a_group)
    w.job(
        B, "B's again of A's avatar", kind=JobKind.AVATAR, input_path=w.selfies[A], parent=a_avatar
    )
    b_avatar = w.job(B, "B's own avatar", kind=JobKind.AVATAR, input_path=w.selfie(B, "blue"))
    # ... and A presses Again under B's avatar: B's selfie stays B's.
    w.job(
        A, "A's again of B's avatar", kind=JobKind.AVATAR, input_path=w.selfies[B], parent=b_avatar
    )

    with store.unit_of_work() as uow:
        ledger.grant(uow.session, A_KEY, 5, DAY, note="festival bonus")
        ledger.grant(uow.session, B_KEY, 3, DAY)
        uow.commit()
    return w


B_PROMPTS = ("a lighthouse in monsoon rain", "B's variation", "B's again", "B's own avatar")


def entries_of(store: Store, key: str, user: str | None = None) -> list[tuple[Any, ...]]:
    """(account, kind, amount, job_id) of an account's entries, or of those about a user's
    jobs whatever the account."""
    with store.unit_of_work() as uow:
        query = (
            select(AccountRow.key, LedgerEntry.kind, LedgerEntry.amount, LedgerEntry.job_id)
            .join(AccountRow, AccountRow.id == LedgerEntry.account_id)
            .order_by(LedgerEntry.id)
        )
        condition = AccountRow.key == key
        if user is not None:
            their_jobs = select(Job.id).join(User).where(User.external_id == user)
            condition = or_(condition, LedgerEntry.job_id.in_(their_jobs))
        return [tuple(row) for row in uow.session.execute(query.where(condition))]


def table_contents(store: Store) -> dict[str, list[dict[str, Any]]]:
    with store.engine.connect() as connection:
        return {
            table.name: [dict(row._mapping) for row in connection.execute(select(table))]
            for table in Base.metadata.sorted_tables
        }


def read_zip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def test_an_export_holds_everything_about_the_user_and_nothing_of_anyone_else(
    world: World,
) -> None:
    a_keys = world.result_keys[A]
    # A result deleted already (by retention, say): listed in jobs.json, not in the ZIP.
    gone = a_keys[1]
    world.artifacts.delete(gone)

    data = world.service.export_zip("telegram", A, README)
    assert data is not None
    files = read_zip(data)

    assert files["README.txt"].decode() == README
    assert world.legacy_path is not None
    legacy_name = "results/" + "/".join(world.legacy_path.parts[-2:])
    assert set(files) == {
        "README.txt",
        "profile.json",
        "jobs.json",
        "ledger.json",
        "reports.json",
        "moderation_log.json",
        *(f"results/{key}" for key in a_keys if key != gone),
        legacy_name,
        f"inputs/{Path(world.selfies[A]).name}",
    }
    for key in a_keys:
        if key != gone:
            assert files[f"results/{key}"] == world.artifacts.get(key)
    assert files[legacy_name] == world.legacy_path.read_bytes()
    assert files[f"inputs/{Path(world.selfies[A]).name}"] == Path(world.selfies[A]).read_bytes()

    profile = json.loads(files["profile.json"])
    assert (profile["channel"], profile["external_id"], profile["display_name"]) == (
        "telegram",
        A,
        "user 42",
    )
    assert profile["created_at"].endswith("+00:00")

    exported = json.loads(files["jobs.json"])
    with world.store.unit_of_work() as uow:
        stored = list(
            uow.session.scalars(
                select(Job).join(User).where(User.external_id == A).order_by(Job.id)
            )
        )
        assert [job["id"] for job in exported] == [job.id for job in stored]
        for job, row in zip(exported, stored, strict=True):
            assert job["prompt"] == row.prompt
            assert job["status"] == row.status
            assert job["command"] == row.command
            assert job["seeds"] == row.seeds
            assert job["options"] == row.options
            assert job["result_paths"] == row.result_paths
            assert job["result_checksums"] == row.result_checksums
            assert job["result_file_ids"] == row.result_file_ids
            assert job["error"] == row.error
            assert [e["status"] for e in job["events"]] == [e.status for e in row.events]
            assert job["created_at"].endswith("+00:00")
    # The deleted result is still listed.
    assert any(gone in (job["result_paths"] or []) for job in exported)
    assert {job["status"] for job in exported} == {"done", "failed"}
    assert not any(job["results_withheld"] for job in exported)
    assert json.loads(files["reports.json"]) == []
    assert json.loads(files["moderation_log.json"]) == []

    expected = entries_of(world.store, A_KEY, user=A)
    exported_ledger = json.loads(files["ledger.json"])
    assert [
        (e["account"], e["kind"], e["amount"], e["job_id"]) for e in exported_ledger
    ] == expected
    assert {e["account"] for e in exported_ledger} == {A_KEY, GROUP_KEY}
    assert {e["job_id"] for e in exported_ledger} - {None} <= set(world.job_ids[A])
    assert any(e["kind"] == "refund" and e["amount"] == 2 for e in exported_ledger)
    assert any(
        e["note"] == "festival bonus" and e["day"] == DAY.isoformat() for e in exported_ledger
    )

    # Nothing of B: not their prompts, results, selfie or ledger.
    everything = b"".join(files.values())
    for prompt in B_PROMPTS:
        assert prompt.encode() not in everything
    for key in world.result_keys[B]:
        assert f"results/{key}" not in files
    assert world.artifacts.get(world.result_keys[B][0]) not in everything
    assert Path(world.selfies[B]).read_bytes() not in files.values()
    assert B_KEY.encode() not in everything
    world.store.dispose()


def test_forgetting_a_user_leaves_no_row_or_file_of_theirs_and_others_intact(
    world: World,
) -> None:
    with world.store.unit_of_work() as uow:
        a_user = uow.session.scalars(select(User.id).where(User.external_id == A)).one()
        a_account = uow.session.scalars(select(AccountRow.id).where(AccountRow.key == A_KEY)).one()
    a_jobs = set(world.job_ids[A])
    a_entries = entries_of(world.store, A_KEY, user=A)
    b_entries = entries_of(world.store, B_KEY, user=B)
    b_results = {key: world.artifacts.get(key) for key in world.result_keys[B]}
    assert world.legacy_path is not None

    report = world.service.forget("telegram", A)

    assert report == ForgetReport(
        jobs=len(a_jobs),
        ledger_entries=len(a_entries),
        artifacts=len(world.result_keys[A]) + 1,  # and the legacy file
        inputs=1,
    )

    # No row of any table, present or added later, names A: a generic scan of every column
    # that holds (or refers to) a user, job or account id, and of every string column.
    forbidden_ids = {"users": {a_user}, "jobs": a_jobs, "accounts": {a_account}}
    by_name = {
        "user_id": "users",
        "job_id": "jobs",
        "parent_job_id": "jobs",
        "account_id": "accounts",
    }
    contents = table_contents(world.store)
    assert set(contents) == {table.name for table in Base.metadata.sorted_tables}
    for table in Base.metadata.sorted_tables:
        for row in contents[table.name]:
            for column in table.columns:
                value = row[column.name]
                targets = {fk.column.table.name for fk in column.foreign_keys}
                if column.primary_key:
                    targets.add(table.name)
                if column.name in by_name:
                    targets.add(by_name[column.name])
                for target in targets:
                    assert value not in forbidden_ids.get(target, set()), (table.name, row)
                if isinstance(column.type, String) and isinstance(value, str):
                    assert value not in {A, A_KEY}, (table.name, row)

    assert not set(world.result_keys[A]) & set(world.artifacts.keys())
    assert not world.legacy_path.exists()
    assert not Path(world.selfies[A]).exists()

    # B's data is intact: user, jobs, results, selfie, ledger, the group's account.
    assert Path(world.selfies[B]).exists()
    assert {key: world.artifacts.get(key) for key in world.result_keys[B]} == b_results
    assert entries_of(world.store, B_KEY, user=B) == b_entries
    with world.store.unit_of_work() as uow:
        assert uow.session.scalar(select(User.id).where(User.external_id == B)) is not None
        b_jobs = {job.id: job for job in uow.session.scalars(select(Job))}
        assert set(b_jobs) == set(world.job_ids[B])
        # The variation of A's image and the Again under A's avatar survive, with no parent.
        variation, again = world.job_ids[B][1], world.job_ids[B][2]
        assert b_jobs[variation].parent_job_id is None
        assert b_jobs[again].parent_job_id is None
        assert b_jobs[variation].status == "done"
        keys = set(uow.session.scalars(select(AccountRow.key)))
        assert keys == {B_KEY, GROUP_KEY}
    world.store.dispose()


def test_an_unknown_user_has_nothing_to_export_or_forget(world: World) -> None:
    before = table_contents(world.store)
    keys = world.artifacts.keys()

    assert world.service.export_zip("telegram", "999", README) is None
    assert world.service.export_zip("web", A, README) is None  # same id, other channel
    assert world.service.forget("telegram", "999") == ForgetReport(0, 0, 0, 0)

    assert table_contents(world.store) == before
    assert world.artifacts.keys() == keys
    assert Path(world.selfies[A]).exists()
    world.store.dispose()


def test_an_account_without_a_user_row_is_exported_and_forgotten(world: World) -> None:
    # Credits granted to someone who has not written yet: only an account row holds them.
    with world.store.unit_of_work() as uow:
        ledger.grant(uow.session, "user:telegram:77", 4, DAY, note="welcome")
        uow.commit()

    data = world.service.export_zip("telegram", "77", README)
    assert data is not None
    files = read_zip(data)
    assert json.loads(files["profile.json"]) == {}
    assert json.loads(files["jobs.json"]) == []
    assert [(e["kind"], e["amount"]) for e in json.loads(files["ledger.json"])] == [("grant", 4)]

    assert world.service.forget("telegram", "77") == ForgetReport(0, 1, 0, 0)
    with world.store.unit_of_work() as uow:
        assert (
            uow.session.scalar(select(func.count()).where(AccountRow.key == "user:telegram:77"))
            == 0
        )
    world.store.dispose()


def test_forgetting_keeps_an_admins_limit_and_what_was_used_today(world: World) -> None:
    """/forget is no way around a limit: the user's account keeps the limit an admin set,
    and their account and the group's keep, as one entry each with no job, what they used
    today. Their jobs still waiting give their credits back: those are deleted, never made."""
    today = quota_day(datetime.now(UTC), ZONE)
    key = "user:telegram:88"
    charge = Charge((Account(key, 10), Account(GROUP_KEY, 50)), 2, today)
    plan = GenerationPlan("a boat race", 64, 64, 4, (1,), 7.0)
    with world.store.unit_of_work() as uow:
        ledger.set_account_limit(uow.session, key, 10)  # an admin's /setquota
        ledger.grant(uow.session, key, 1, today)
        uow.commit()
    for outcome in ("done", "failed", "running"):
        with world.store.unit_of_work() as uow:
            job_id = jobs.take_in(
                uow, world.origin("88", GROUP), JobKind.PORTRAIT, plan, charge=charge
            ).job_id
            jobs.start_job(uow, job_id, "worker-1")
            if outcome == "done":
                jobs.complete_job(
                    uow,
                    job_id,
                    result_paths=["results/x.png"],
                    result_file_ids=["file-x"],
                    generation_seconds=1.0,
                )
            elif outcome == "failed":
                jobs.fail_job(uow, job_id, "RuntimeError: out of memory")

    def left(account: Account) -> int | None:
        with world.store.unit_of_work() as uow:
            return ledger.balance(uow.session, account, today)

    assert (left(Account(key, 10)), left(Account(GROUP_KEY, 50))) == (10 + 1 - 4, 50 - 4)

    world.service.forget("telegram", "88")

    # The running job's 2 credits came back; the done job's stay spent, and the grant given.
    assert (left(Account(key, 10)), left(Account(GROUP_KEY, 50))) == (10 + 1 - 2, 50 - 2)
    with world.store.unit_of_work() as uow:
        assert ledger.account_limit(uow.session, key) == 10
        assert uow.session.scalar(select(User.id).where(User.external_id == "88")) is None
    kept = [(k, kind, amount, job) for k, kind, amount, job in entries_of(world.store, key)]
    assert kept == [(key, ledger.CARRIED, -1, None)]
    carried = [e for e in entries_of(world.store, GROUP_KEY) if e[1] == ledger.CARRIED]
    assert carried == [(GROUP_KEY, ledger.CARRIED, -2, None)]

    # Kept while the day counts; once it is over, the retention sweep deletes them, and the
    # account when nothing else holds it (the group's stays).
    with world.store.unit_of_work() as uow:
        assert retention.forget_carried_before(uow, today) == 0
        ledger.set_account_limit(uow.session, key, None)  # the admin lifted the limit
        uow.commit()
    with world.store.unit_of_work() as uow:
        assert retention.forget_carried_before(uow, today + timedelta(days=1)) == 2
        keys = set(uow.session.scalars(select(AccountRow.key)))
    assert key not in keys and GROUP_KEY in keys
    assert not [e for e in entries_of(world.store, GROUP_KEY) if e[1] == ledger.CARRIED]
    world.store.dispose()


def test_the_sweep_leaves_an_account_a_returning_user_is_reserving_on(postgres_url: str) -> None:
    """The sweep deletes a forgotten user's account once their carried entries go; when
    they come back meanwhile, their reserve holds the account's row and adds an entry.
    A DELETE that waited for that row would not see the entry (READ COMMITTED) and fail
    the foreign key; the sweep must leave the account, and the reserve stand."""
    import threading
    import time

    from sqlalchemy import text as sql

    upgrade_to_head(postgres_url)
    store = Store(postgres_url)
    today = date(2025, 3, 2)
    key = "user:telegram:77"
    with store.unit_of_work() as uow:
        account = AccountRow(key=key, lock_version=0)
        uow.session.add(account)
        uow.session.flush()
        uow.session.add(
            LedgerEntry(account_id=account.id, kind=ledger.CARRIED, amount=-1, day=today)
        )
        uow.commit()

    swept: list[int | BaseException] = []

    def sweep() -> None:
        try:
            with store.unit_of_work() as uow:
                swept.append(retention.forget_carried_before(uow, today + timedelta(days=1)))
        except BaseException as exc:
            swept.append(exc)

    origin = Origin("telegram", 77, "private", "77", "Ravi", "en", 1)
    plan = GenerationPlan("a kite festival", 64, 64, 4, (1,), 7.0)
    charge = Charge((Account(key, 10),), 2, today + timedelta(days=1))
    with store.unit_of_work() as returning:
        jobs.take_in(returning, origin, JobKind.PORTRAIT, plan, charge=charge, commit=False)
        sweeper = threading.Thread(target=sweep)
        sweeper.start()
        # Until the sweep is done, or waits for the reserve's lock.
        deadline = time.monotonic() + 10
        with store.engine.connect() as watcher:
            while sweeper.is_alive() and time.monotonic() < deadline:
                waiting = watcher.scalar(
                    sql(
                        "select count(*) from pg_stat_activity"
                        " where datname = current_database() and wait_event_type = 'Lock'"
                    )
                )
                watcher.rollback()  # pg_stat_activity is read once a transaction
                if waiting:
                    break
                time.sleep(0.05)
        returning.commit()
    sweeper.join(30)
    assert swept == [1]  # the carried entry went, and nothing failed
    assert [(k, kind) for k, kind, _, _ in entries_of(store, key)] == [(key, ledger.RESERVE)]
    store.dispose()


def test_an_export_leaves_out_the_images_the_content_check_withheld(world: World) -> None:
    """The content check blocked a job: its images stay stored for the admins' review, and
    the user was told they were held back. The export lists the job, marked withheld, but
    does not hand the images over; /forget deletes them with the rest."""
    with world.store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, world.origin(A, GROUP), JobKind.PORTRAIT, PLAN).job_id
        jobs.start_job(uow, job_id, "worker-1")
        stored = world.artifacts.put(f"results/{job_id}/0-9.png", b"flagged image of A")
        blocked = jobs.block_job(
            uow,
            job_id,
            "blocked by the content check",
            result_paths=[stored.key],
            result_checksums=[stored.sha256],
        )
        assert blocked is not None and blocked.status == JobStatus.BLOCKED

    data = world.service.export_zip("telegram", A, README)
    assert data is not None
    files = read_zip(data)
    assert not [name for name in files if name.startswith(f"results/results/{job_id}/")]
    assert b"flagged image of A" not in files.values()
    # A's other results are all there.
    assert {f"results/{key}" for key in world.result_keys[A]} <= set(files)
    exported = {job["id"]: job for job in json.loads(files["jobs.json"])}
    assert exported[job_id]["status"] == "blocked"
    assert exported[job_id]["result_paths"] == [stored.key]
    assert [i for i, job in exported.items() if job["results_withheld"]] == [job_id]

    report = world.service.forget("telegram", A)
    # Every result of A's, the legacy file and the withheld image.
    assert report.artifacts == len(world.result_keys[A]) + 2
    assert not world.artifacts.exists(stored.key)
    world.store.dispose()


def test_an_export_holds_the_reports_filed_and_the_moderation_records_of_the_user(
    world: World,
) -> None:
    """/privacy promises the records of admin and moderation actions that concern the user,
    and the reports they filed: the export holds both. Not another member's
    report of their image (the reporter stays unnamed), nor anything of another channel."""
    a_job, b_job = world.job_ids[A][0], world.job_ids[B][0]
    web_origin = Origin("web", 7, "private", "7", "web user", "en", 1)
    with world.store.unit_of_work() as uow:
        web_job = jobs.take_in(uow, web_origin, JobKind.PORTRAIT, PLAN).job_id
    with world.store.unit_of_work() as uow:
        filed = audit.open_report(uow, b_job, A, GROUP)  # A reports B's image
        on_a = audit.open_report(uow, a_job, B, GROUP)  # B reports A's image
        by_77 = audit.open_report(uow, a_job, "77", GROUP)  # a member who never asked
        on_web = audit.open_report(uow, web_job, A, 7)  # web's user 42 is someone else
    assert filed and on_a and by_77 and on_web

    def event(action: str, target: str, *, actor: str = "1", channel: str = "telegram") -> int:
        with world.store.unit_of_work() as uow:
            return audit.record(
                uow,
                channel=channel,
                actor=actor,
                actor_role="system" if actor == "system" else "bot_admin",
                action=action,
                target=target,
                chat_id=GROUP,
                detail={"note": f"{action} {target}"},
            )

    concerning = [
        event("grant", f"user:{A}"),
        event("prompt_blocked", f"user:{A}", actor="system"),
        event("output_block", f"job:{a_job}", actor="system"),
        event("report", f"job:{b_job}", actor=A),
        event("review_dismissed", f"job:{a_job}"),
    ]
    event("report", f"job:{a_job}", actor=B)  # B's report of A's image
    event("grant", f"user:{B}")
    event("ban", f"user:{A}", channel="web")

    data = world.service.export_zip("telegram", A, README)
    assert data is not None
    files = read_zip(data)
    reports = json.loads(files["reports.json"])
    assert [(r["id"], r["job_id"], r["reporter"], r["status"]) for r in reports] == [
        (filed.id, b_job, A, "open")
    ]
    assert reports[0]["at"].endswith("+00:00")
    moderation = json.loads(files["moderation_log.json"])
    assert [e["id"] for e in moderation] == concerning
    assert moderation[1]["action"] == "prompt_blocked"
    assert moderation[1]["detail"] == {"note": f"prompt_blocked user:{A}"}
    assert B not in {e["actor"] for e in moderation}

    # A member who only ever reported has no user row: their reports are still theirs.
    data = world.service.export_zip("telegram", "77", README)
    assert data is not None
    files = read_zip(data)
    assert json.loads(files["profile.json"]) == {}
    assert [r["id"] for r in json.loads(files["reports.json"])] == [by_77.id]

    # /forget deletes the reports on their images; the reports each filed on others' images
    # stay open for the admins, naming no one; the web user's are not touched.
    world.service.forget("telegram", "77")
    world.service.forget("telegram", A)
    with world.store.unit_of_work() as uow:
        left = uow.session.execute(select(Report.id, Report.reporter, Report.status))
        assert sorted(tuple(row) for row in left) == [
            (filed.id, "", "open"),
            (on_web.id, A, "open"),
        ]
        assert len(audit.latest(uow, 100)) == 8  # the audit log keeps its records
    data = world.service.export_zip("telegram", A, README)
    assert data is None or json.loads(read_zip(data)["reports.json"]) == []
    world.store.dispose()


def test_forgetting_a_banned_user_keeps_the_ban(world: World) -> None:
    """A ban is a column of the user's row: /forget keeps the row, emptied of everything
    but the ban, so that forgetting is no way around a ban (an admin's /ban may land just
    after the confirmation passed the gate)."""
    with world.store.unit_of_work() as uow:
        audit.set_banned(uow, "telegram", A, True)
        assert uow.session.scalar(select(User.display_name).where(User.external_id == A))

    report = world.service.forget("telegram", A)

    assert report.jobs == len(world.job_ids[A])
    with world.store.unit_of_work() as uow:
        assert audit.is_banned(uow, "telegram", A)
        row = uow.session.scalars(select(User).where(User.external_id == A)).one()
        assert (row.display_name, row.default_style, row.language) == (None, None, "en")
        assert not list(uow.session.scalars(select(Job.id).where(Job.user_id == row.id)))
    # What is left is the ban alone, and forgetting again changes nothing.
    data = world.service.export_zip("telegram", A, README)
    assert data is not None
    profile = json.loads(read_zip(data)["profile.json"])
    assert profile["banned"] is True and profile["display_name"] is None
    world.service.forget("telegram", A)
    with world.store.unit_of_work() as uow:
        assert audit.is_banned(uow, "telegram", A)
    world.store.dispose()


def _waits_for_a_lock(store: Store, alive: threading.Thread, seconds: float = 10) -> bool:
    """Whether a transaction of this database waits for a row lock before `alive` ends."""
    deadline = time.monotonic() + seconds
    with store.engine.connect() as watcher:
        while alive.is_alive() and time.monotonic() < deadline:
            waiting = watcher.scalar(
                sql(
                    "select count(*) from pg_stat_activity"
                    " where datname = current_database() and wait_event_type = 'Lock'"
                )
            )
            watcher.rollback()  # pg_stat_activity is read once a transaction
            if waiting:
                return True
            time.sleep(0.05)
    return False


def _forget_in_thread(service: PrivacyService, user: str) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def forget() -> None:
        try:
            outcome.append(service.forget("telegram", user))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=forget)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("admin_action", ["grant", "set_quota"])
def test_forget_waits_for_an_admins_grant_or_limit_on_the_account(
    postgres_url: str, tmp_path: Path, admin_action: str
) -> None:
    """/forget deletes an account with no limit and nothing used today. An admin's /grant
    or /setquota on it, in flight, holds the row's lock: /forget must decide after it
    commits. A DELETE that merely waited would not see the grant's entry (READ COMMITTED)
    and fail the foreign key, or delete the limit just set."""
    upgrade_to_head(postgres_url)
    store = Store(postgres_url)
    service = PrivacyService(
        store, LocalArtifactStore(tmp_path / "a"), MediaStore(tmp_path / "m"), ZONE
    )
    key = "user:telegram:77"
    today = quota_day(datetime.now(UTC), ZONE)
    origin = Origin("telegram", 77, "private", "77", "Ravi", "en", 1)
    with store.unit_of_work() as uow:  # charged yesterday: the account exists, unused today
        charge = Charge((Account(key, 10),), 1, today - timedelta(days=1))
        jobs.take_in(uow, origin, JobKind.PORTRAIT, PLAN, charge=charge)

    with store.unit_of_work() as admin:
        if admin_action == "grant":
            ledger.grant(admin.session, key, 5, today, note="bonus")
        else:
            ledger.set_account_limit(admin.session, key, 10)
        forgetting, outcome = _forget_in_thread(service, "77")
        assert _waits_for_a_lock(store, forgetting)
        admin.commit()
    forgetting.join(30)

    assert outcome == [ForgetReport(jobs=1, ledger_entries=1 + (admin_action == "grant"))]
    with store.unit_of_work() as uow:
        if admin_action == "grant":
            # The grant stands (carried, as what the day holds).
            assert ledger.balance(uow.session, Account(key, 10), today) == 15
        else:
            assert ledger.account_limit(uow.session, key) == 10
    store.dispose()


def test_forget_waits_for_a_variation_of_its_result_being_taken_in(
    postgres_url: str, tmp_path: Path
) -> None:
    """An admin presses a button under the user's result as they /forget: the variation's
    insert holds the parent's key lock. /forget must wait for it and detach it (no parent),
    not delete the parent from under it and fail on fk_jobs_parent_job_id_jobs."""
    upgrade_to_head(postgres_url)
    store = Store(postgres_url)
    artifacts, media = LocalArtifactStore(tmp_path / "a"), MediaStore(tmp_path / "m")
    service = PrivacyService(store, artifacts, media, ZONE)
    w = World(store, artifacts, media, service, tmp_path)
    a_job = w.job(A, "a tea stall at dusk")

    with store.unit_of_work() as other:
        variation = jobs.take_in(
            other,
            w.origin(B, GROUP),
            JobKind.VARIATION,
            PLAN,
            parent_job_id=a_job,
            parent_index=0,
            commit=False,
        ).job_id
        forgetting, outcome = _forget_in_thread(service, A)
        assert _waits_for_a_lock(store, forgetting)
        other.commit()
    forgetting.join(30)

    assert len(outcome) == 1 and isinstance(outcome[0], ForgetReport), outcome
    assert outcome[0].jobs == 1
    with store.unit_of_work() as uow:
        assert (
            uow.session.scalars(select(Job.parent_job_id).where(Job.id == variation)).one() is None
        )
        assert list(uow.session.scalars(select(Job.id))) == [variation]
    store.dispose()
