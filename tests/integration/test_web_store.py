"""The web chat's records on real databases (SQLite and PostgreSQL): sign-in links and
sessions, messages and their change feed, and the worker's delivery into a chat."""

from __future__ import annotations

import io
import random
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from PIL import Image
from sqlalchemy import func, select, update

from chitrakar.artifacts import artifact_store_from_url
from chitrakar.config import Settings
from chitrakar.domain import Command, GenerationPlan, ImageRequest, JobKind
from chitrakar.media import MediaStore
from chitrakar.planning import Defaults, plan_request
from chitrakar.privacy import PrivacyService
from chitrakar.retention import sweep
from chitrakar.styles import load_catalogue
from db import jobs, web
from db.jobs import Origin
from db.models import WebChange, WebMessage, WebSession, WebSignInLink
from db.session import Store
from workers.web_delivery import WebDelivery


def account(store: Store, name: str = "asha", admin: bool = False) -> web.AccountView:
    with store.unit_of_work() as uow:
        return web.ensure_account(uow, name, is_admin=admin)


def link(store: Store, account_id: int, hours: float = 1) -> str:
    with store.unit_of_work() as uow:
        return web.issue_sign_in_link(uow, account_id, timedelta(hours=hours))


def redeem(store: Store, token: str) -> tuple[web.AccountView, str] | None:
    with store.unit_of_work() as uow:
        return web.redeem_sign_in_link(uow, token, timedelta(days=1))


def test_a_sign_in_link_works_once_and_only_its_hash_is_kept(store: Store) -> None:
    asha = account(store)
    token = link(store, asha.id)
    redeemed = redeem(store, token)
    assert redeemed is not None
    signed_in, secret = redeemed
    assert signed_in == asha
    assert redeem(store, token) is None
    with store.unit_of_work() as uow:
        assert web.session_of(uow, secret) == web.SessionView(
            asha, uow.session.scalars(select(WebSession.csrf_token)).one()
        )
        stored = [
            *uow.session.scalars(select(WebSignInLink.token_hash)),
            *uow.session.scalars(select(WebSession.token_hash)),
        ]
    assert token not in stored and secret not in stored
    assert web.token_hash(token) in stored and web.token_hash(secret) in stored


def test_a_link_raced_by_two_browsers_signs_in_one(store: Store) -> None:
    token = link(store, account(store).id)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: redeem(store, token), range(8)))
    assert sum(result is not None for result in results) == 1
    with store.unit_of_work() as uow:
        assert uow.session.scalar(select(func.count()).select_from(WebSession)) == 1


def test_expired_links_and_sessions_sign_no_one_in(store: Store) -> None:
    asha = account(store)
    expired = link(store, asha.id, hours=-1)
    assert redeem(store, expired) is None
    redeemed = redeem(store, link(store, asha.id))
    assert redeemed is not None
    _, secret = redeemed
    with store.unit_of_work() as uow:
        uow.session.execute(
            update(WebSession).values(expires_at=web.utcnow() - timedelta(seconds=1))
        )
        uow.commit()
    with store.unit_of_work() as uow:
        assert web.session_of(uow, secret) is None
        assert web.session_of(uow, "not-a-session") is None
        assert web.end_expired(uow, web.utcnow()) == 2


def test_an_invite_of_an_existing_name_keeps_the_account_and_only_adds_admin(store: Store) -> None:
    first = account(store, "Asha ")
    assert first.name == "asha" and not first.is_admin
    again = account(store, "asha", admin=True)
    assert again.id == first.id and again.is_admin
    assert account(store, "asha").is_admin  # an invite never demotes
    with store.unit_of_work() as uow:
        assert [a.name for a in web.accounts(uow)] == ["asha"]


def test_messages_and_edits_reach_the_feed_in_order_and_stay_in_their_chat(store: Store) -> None:
    asha, ravi = account(store, "asha"), account(store, "ravi")
    with store.unit_of_work() as uow:
        start = web.last_change_id(uow)
    with store.unit_of_work() as uow:
        first = web.post(uow, asha.id, from_bot=False, text="/portrait a kite")
        status = web.post(uow, asha.id, from_bot=True, text="Queued", reply_to=first)
        theirs = web.post(uow, ravi.id, from_bot=False, text="/quota")
        assert web.edit(uow, asha.id, status, text="Creating… 50%")
        # Another chat's message id changes nothing.
        assert not web.edit(uow, asha.id, theirs, text="forged")
        assert web.edit(uow, asha.id, status, deleted=True)
    with store.unit_of_work() as uow:
        mine = web.changes_after(uow, start, asha.id)
        everyone = web.changes_after(uow, start)
        assert [message for _, _, message in mine] == [first, status, status, status]
        assert [chat for _, chat, _ in everyone] == [asha.id, asha.id, ravi.id, asha.id, asha.id]
        assert [change for change, _, _ in everyone] == sorted(c for c, _, _ in everyone)
        shown = web.recent_messages(uow, asha.id, 10)
        assert [m.id for m in shown] == [first]  # the status message was removed
        assert web.messages(uow, ravi.id, [theirs])[0].text == "/quota"
        assert web.messages(uow, asha.id, [theirs]) == []


def plan_for(count: int = 2) -> GenerationPlan:
    request = ImageRequest(Command.PORTRAIT, "a kite over the ghats")
    plan = plan_request(
        request, None, avatar_prompt="", defaults=Defaults(64, 4, 7.0), rng=random.Random(3)
    )
    return replace(plan, seeds=tuple(range(count)))


def web_job(store: Store, chat: int, request_message: int, status_message: int) -> jobs.JobView:
    origin = Origin(
        channel=web.CHANNEL,
        chat_id=chat,
        chat_type="private",
        user_external_id=str(chat),
        user_display_name="asha",
        language="en",
        request_message_id=request_message,
    )
    with store.unit_of_work() as uow:
        job_id = jobs.take_in(uow, origin, JobKind.PORTRAIT, plan_for()).job_id
    with store.unit_of_work() as uow:
        jobs.attach_status_message(uow, job_id, status_message)
    with store.unit_of_work() as uow:
        view = jobs.start_job(uow, job_id, "worker-1")
    assert view is not None
    return view


def test_the_worker_delivers_into_the_chat_and_removes_the_status(store: Store) -> None:
    asha = account(store)
    with store.unit_of_work() as uow:
        asked = web.post(uow, asha.id, from_bot=False, text="/portrait a kite --n 2")
        status = web.post(uow, asha.id, from_bot=True, text="Queued", reply_to=asked)
    job = web_job(store, asha.id, asked, status)
    delivery = WebDelivery(Settings(progress_interval=0), store, load_catalogue())
    delivery.started(job)
    delivery.progress(job, 2, 4)
    with store.unit_of_work() as uow:
        assert web.messages(uow, asha.id, [status])[0].text.endswith("50%")
    images = [Image.new("RGB", (8, 8)) for _ in range(2)]
    sent = delivery.deliver(job, images, 1.5, spoiler=True)
    assert sent.file_ids == [f"{job.id}/0", f"{job.id}/1"]
    sent.follow_up()  # once the worker has recorded the delivery
    with store.unit_of_work() as uow:
        (result,) = web.messages(uow, asha.id, sent.message_ids)
        assert web.messages(uow, asha.id, [status])[0].deleted
    assert result.from_bot and result.reply_to == asked and result.spoiler
    assert [(i["job"], i["index"]) for i in result.images] == [(job.id, 0), (job.id, 1)]
    assert "Seed 1" in result.images[1]["caption"]
    data = [data for row in result.buttons for _, data in row]
    assert f"u:{job.id}:0" in data and f"v:{job.id}:1" in data and f"a:{job.id}" in data


def refuse_marking_deleted(store: Store) -> None:
    """From now on the database refuses to mark a message deleted (as a lock timeout or a
    dropped connection would, for a moment)."""
    with store.engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE UPDATE OF deleted ON web_messages "
                "BEGIN SELECT RAISE(ABORT, 'database is locked'); END"
            )
        else:
            connection.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'lock timeout'; END $$ LANGUAGE plpgsql"
            )
            connection.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE UPDATE OF deleted ON web_messages "
                "FOR EACH ROW EXECUTE FUNCTION refuse()"
            )


def test_a_result_in_the_chat_stays_delivered_when_its_status_cannot_be_removed(
    store: Store,
) -> None:
    """Removing the status message follows the recorded delivery and never raises: its
    failure must not make the worker fail (and refund) a job whose images are in the chat."""
    asha = account(store)
    with store.unit_of_work() as uow:
        asked = web.post(uow, asha.id, from_bot=False, text="/portrait a kite")
        status = web.post(uow, asha.id, from_bot=True, text="Queued", reply_to=asked)
    job = web_job(store, asha.id, asked, status)
    delivery = WebDelivery(Settings(progress_interval=0), store, load_catalogue())
    refuse_marking_deleted(store)
    sent = delivery.deliver(job, [Image.new("RGB", (8, 8))], 1.0)
    sent.follow_up()
    with store.unit_of_work() as uow:
        (result,) = web.messages(uow, asha.id, sent.message_ids)
        assert result.images and not web.messages(uow, asha.id, [status])[0].deleted


def test_progress_never_covers_the_cancelled_status(store: Store) -> None:
    asha = account(store)
    with store.unit_of_work() as uow:
        asked = web.post(uow, asha.id, from_bot=False, text="/portrait a kite")
        status = web.post(uow, asha.id, from_bot=True, text="Queued", reply_to=asked)
    job = web_job(store, asha.id, asked, status)
    delivery = WebDelivery(Settings(progress_interval=0), store, load_catalogue())
    delivery.progress(job, 1, 4)
    with store.unit_of_work() as uow:
        assert jobs.cancel_jobs(uow, web.CHANNEL, asha.id, str(asha.id))
    with store.unit_of_work() as uow:
        assert web.edit(uow, asha.id, status, text="Cancelled.")
    delivery.progress(job, 3, 4)  # late, from the worker that has not noticed yet
    with store.unit_of_work() as uow:
        assert web.messages(uow, asha.id, [status])[0].text == "Cancelled."


def test_a_failure_is_told_on_the_status_message_or_else_as_a_reply(store: Store) -> None:
    asha = account(store)
    with store.unit_of_work() as uow:
        asked = web.post(uow, asha.id, from_bot=False, text="/portrait a kite")
        status = web.post(uow, asha.id, from_bot=True, text="Queued")
    job = web_job(store, asha.id, asked, status)
    delivery = WebDelivery(Settings(), store, load_catalogue())
    delivery.apologise(job)
    with store.unit_of_work() as uow:
        assert f"job {job.id}" in web.messages(uow, asha.id, [status])[0].text
        # The status message is gone (the whole chat forgotten meanwhile, say): a reply.
        uow.session.execute(WebMessage.__table__.delete().where(WebMessage.id == status))
        uow.commit()
    delivery.blocked(job)
    with store.unit_of_work() as uow:
        last = web.recent_messages(uow, asha.id, 1)[0]
    assert last.reply_to == asked and "content check" in last.text.lower()


def test_export_holds_the_chat_and_forget_deletes_it(store: Store, tmp_path: Path) -> None:
    asha, ravi = account(store, "asha"), account(store, "ravi")
    with store.unit_of_work() as uow:
        web.post(uow, asha.id, from_bot=False, text="/help")
        web.post(uow, ravi.id, from_bot=False, text="/portrait ravi's secret")
    privacy = PrivacyService(
        store,
        artifact_store_from_url(None, tmp_path),
        MediaStore(tmp_path / "media"),
        ZoneInfo("UTC"),
    )
    # Only messages so far (no job, no credits): still theirs to export and to forget.
    archive = privacy.export_zip(web.CHANNEL, str(asha.id), "readme")
    assert archive is not None
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        exported = opened.read("messages.json").decode()
    assert "/help" in exported and "ravi" not in exported
    privacy.forget(web.CHANNEL, str(asha.id))
    with store.unit_of_work() as uow:
        assert web.recent_messages(uow, asha.id, 10) == []
        # Of the chat's feed, only the mark that tells its open pages to start again.
        left = uow.session.scalars(
            select(WebChange.message_id).where(WebChange.chat_id == asha.id)
        ).all()
        assert left == [web.CLEARED]
        assert [m.text for m in web.recent_messages(uow, ravi.id, 10)] == [
            "/portrait ravi's secret"
        ]
    assert privacy.export_zip(web.CHANNEL, str(asha.id), "readme") is None


def test_the_retention_sweep_deletes_old_messages_and_expired_sign_ins(
    store: Store, tmp_path: Path
) -> None:
    asha = account(store)
    with store.unit_of_work() as uow:
        old = web.post(uow, asha.id, from_bot=False, text="/portrait long ago")
        recent = web.post(uow, asha.id, from_bot=False, text="/portrait today")
        long_ago = web.utcnow() - timedelta(days=31)
        uow.session.execute(
            update(WebMessage).where(WebMessage.id == old).values(created_at=long_ago)
        )
        uow.session.execute(update(WebChange).values(at=long_ago))
        uow.commit()
    expired = link(store, asha.id, hours=-1)
    report = sweep(
        Settings(retention_days=30),
        store,
        artifact_store_from_url(None, tmp_path),
        MediaStore(tmp_path / "media"),
        web.utcnow(),
    )
    assert report.web_messages == 1
    with store.unit_of_work() as uow:
        assert [m.id for m in web.recent_messages(uow, asha.id, 10)] == [recent]
        assert web.changes_after(uow, 0) == []
        assert uow.session.scalar(select(func.count()).select_from(WebSignInLink)) == 0
    assert redeem(store, expired) is None


def test_a_reader_following_a_chat_misses_no_change_while_many_write_at_once(
    store: Store,
) -> None:
    """Ids from a sequence can commit out of order (PostgreSQL): a page that moved past a
    later id would never see an earlier one. Writers of one chat take turns, so it cannot."""
    asha = account(store)
    done = threading.Event()
    seen: set[int] = set()

    def follow() -> None:
        after = 0
        while True:
            finished = done.is_set()
            with store.unit_of_work() as uow:
                changes = web.changes_after(uow, after, asha.id)
            seen.update(message for _, _, message in changes)
            if changes:
                after = changes[-1][0]
            if finished:
                return
            # The real feed polls every 0.25 s; a reader spinning without a pause would hold
            # the GIL so much that SQLite's waiting writers starve past their busy timeout.
            time.sleep(0.002)

    def write(n: int) -> list[int]:
        ids = []
        for i in range(25):
            with store.unit_of_work() as uow:
                ids.append(web.post(uow, asha.id, from_bot=True, text=f"{n}-{i}"))
        return ids

    # A daemon, stopped even when a writer fails: a reader left spinning would slow every
    # later test and keep pytest from exiting.
    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            written = {message for ids in pool.map(write, range(8)) for message in ids}
    finally:
        done.set()
        reader.join(30)
    assert seen == written
