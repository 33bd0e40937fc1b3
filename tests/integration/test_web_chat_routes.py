"""The web chat's routes at their edges. What one user can take from everyone else: calls in
progress and open event streams are limited per account, and the web chat's blocking work runs
on threads of its own, apart from those Telegram's handlers use. What odd requests and a
database away get: a clear answer, never a 500. The real routes and services, in this process,
on both databases."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from bot.bootstrap import BotServices, bootstrap
from bot.web.chat import WebChat
from bot.web.server import (
    CALLS_PER_ACCOUNT,
    STREAMS_PER_ACCOUNT,
    WEB_CHAT_THREADS,
    WebChatRoutes,
)
from chitrakar.config import Settings
from chitrakar.domain import Command, ImageRequest
from chitrakar.texts import text
from db import jobs
from db import web as records
from db.migrate import upgrade_to_head

COOKIE = "chitrakar_session"


@dataclass
class Visitor:
    """A signed-in browser of one account: its own client, cookie and CSRF token."""

    client: TestClient[web.Request, web.Application]
    chat: int
    csrf: str

    async def send(self, line: str) -> ClientResponse:
        return await self.client.post(
            "/send",
            data={"text": line},
            headers={"X-CSRF-Token": self.csrf, "X-Requested-With": "fetch"},
        )

    async def stalled_send(self, line: str, release: asyncio.Event) -> ClientResponse:
        """A send whose body arrives only when `release` is set (a slow upload)."""

        async def body() -> AsyncIterator[bytes]:
            yield b"text="
            await release.wait()
            yield line.encode()

        return await self.client.post(
            "/send",
            data=body(),
            headers={
                "X-CSRF-Token": self.csrf,
                "X-Requested-With": "fetch",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )


@pytest.fixture
def services(tmp_path: Path, database_url: str) -> Iterator[BotServices]:
    upgrade_to_head(database_url)
    built = bootstrap(Settings(data_dir=tmp_path, database_url=database_url))
    yield built
    built.close()


@pytest.fixture
async def served(
    services: BotServices,
) -> AsyncIterator[tuple[WebChatRoutes, TestServer]]:
    app = web.Application()
    routes = WebChatRoutes(services)
    routes.add_to(app)
    server = TestServer(app)
    await server.start_server()
    yield routes, server
    await server.close()


async def visitor(services: BotServices, server: TestServer, name: str) -> Visitor:
    with services.store.unit_of_work() as uow:
        account = records.ensure_account(uow, name, False)
        link = records.issue_sign_in_link(uow, account.id, timedelta(hours=1))
        redeemed = records.redeem_sign_in_link(uow, link, timedelta(days=1))
        assert redeemed is not None
        session = records.session_of(uow, redeemed[1])
        assert session is not None
    client: TestClient[web.Request, web.Application] = TestClient(server)
    await client.start_server()
    client.session.cookie_jar.update_cookies({COOKIE: redeemed[1]})
    return Visitor(client, account.id, session.csrf_token)


def chat_texts(services: BotServices, chat: int) -> list[str]:
    with services.store.unit_of_work() as uow:
        return [m.text for m in records.recent_messages(uow, chat, 100)]


async def test_calls_one_account_has_in_progress_are_limited_and_the_next_told_to_wait(
    services: BotServices, served: tuple[WebChatRoutes, TestServer]
) -> None:
    """Two slow uploads at once are taken; a third call of the same account (a line or a
    button) is refused at once with a clear answer, before its body is read, and nothing of
    it is kept. Another account is not held up, and once the uploads end, calls go again."""
    _, server = served
    asha, ravi = await visitor(services, server, "asha"), await visitor(services, server, "ravi")
    release = asyncio.Event()
    uploads: list[asyncio.Task[ClientResponse]] = []
    deadline = time.monotonic() + 10
    while True:
        # An upload that came while the last try held a place was refused: it goes again.
        for refused_upload in [u for u in uploads if u.done()]:
            assert refused_upload.result().status == 429
            uploads.remove(refused_upload)
        while len(uploads) < CALLS_PER_ACCOUNT:
            uploads.append(asyncio.create_task(asha.stalled_send("/quota", release)))
        await asyncio.sleep(0.1)  # their requests reach their handlers
        before = chat_texts(services, asha.chat)
        refused = await asha.send("/help")
        if refused.status == 429 and not any(u.done() for u in uploads):
            break
        assert time.monotonic() < deadline, "the stalled uploads were never counted"
    assert await refused.text() == text("en", "web.busy")
    press = await asha.client.post(
        "/press",
        data={"data": "h:1:1", "under": "1"},
        headers={"X-CSRF-Token": asha.csrf, "X-Requested-With": "fetch"},
    )
    assert press.status == 429
    assert chat_texts(services, asha.chat) == before

    other = await ravi.send("/quota")
    assert other.status == 200
    assert any(t.startswith("/quota") for t in chat_texts(services, ravi.chat))

    release.set()
    assert [r.status for r in await asyncio.gather(*uploads)] == [200] * CALLS_PER_ACCOUNT
    assert (await asha.send("/help")).status == 200
    for user in (asha, ravi):
        await user.client.close()


async def first_line(stream: ClientResponse) -> bytes:
    return await asyncio.wait_for(stream.content.readline(), 10)


async def test_open_streams_are_limited_per_account_and_the_one_over_is_told_why(
    services: BotServices, served: tuple[WebChatRoutes, TestServer]
) -> None:
    """A tab each: the account's streams up to the limit follow the chat; one more is told
    why in an event of its own and when to ask again, then ended. A closed tab's place is
    free again once the chat next changes."""
    _, server = served
    asha = await visitor(services, server, "asha")
    streams = [await asha.client.get("/events") for _ in range(STREAMS_PER_ACCOUNT)]
    for stream in streams:
        assert stream.status == 200
        assert await first_line(stream) == b"retry: 3000\n"

    over = await asha.client.get("/events")
    body = await asyncio.wait_for(over.text(), 10)  # ended by the server
    assert body.startswith("retry: 30000\nevent: notice\ndata: ")
    assert text("en", "web.too_many_tabs", seconds=30) in body.encode().decode("unicode_escape")

    streams.pop().close()
    deadline = time.monotonic() + 10
    while True:
        # A change in the chat wakes every stream: the closed one's write fails, and it ends.
        assert (await asha.send("/help")).status == 200
        again = await asha.client.get("/events")
        if await first_line(again) == b"retry: 3000\n":
            break
        again.close()
        assert time.monotonic() < deadline, "a closed stream's place was never freed"
        await asyncio.sleep(0.2)
    again.close()
    for stream in streams:
        stream.close()
    await asha.client.close()


async def test_the_web_chat_works_on_threads_of_its_own(
    services: BotServices, served: tuple[WebChatRoutes, TestServer]
) -> None:
    """With every one of the web chat's threads busy, a web request waits for one, while the
    threads Telegram's handlers run their blocking calls on stay free."""
    routes, server = served
    asha = await visitor(services, server, "asha")
    free = threading.Event()
    busy = [routes.threads.submit(free.wait, 30) for _ in range(WEB_CHAT_THREADS)]
    try:
        sending = asyncio.create_task(asha.send("/help"))
        await asyncio.sleep(0.5)
        assert not sending.done()
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "answered"), 5) == "answered"
    finally:
        free.set()
    assert (await asyncio.wait_for(sending, 10)).status == 200
    assert all(future.result() for future in busy)
    await asha.client.close()


async def test_a_command_and_a_second_line_typed_with_shift_enter_is_understood(
    services: BotServices, served: tuple[WebChatRoutes, TestServer]
) -> None:
    """Browsers send a form's line breaks as CRLF: the command's name ends at the break."""
    _, server = served
    asha = await visitor(services, server, "asha")
    assert (await asha.send("/quota\r\nplease")).status == 200
    said = chat_texts(services, asha.chat)
    assert said[0] == "/quota\nplease"
    assert not any("know the command" in t for t in said)
    assert any(t.startswith("Credits left today") for t in said), said
    await asha.client.close()


@contextlib.contextmanager
def database_away(services: BotServices, url: str) -> Iterator[None]:
    """The database refuses new connections for a while (and pooled ones are gone)."""
    engine = services.store.engine
    if url.startswith("sqlite"):
        path = Path(sqlalchemy.make_url(url).database or "")
        path.rename(path.with_suffix(".away"))
        path.mkdir()  # a folder where the file was: SQLite cannot open it
        engine.dispose()
        try:
            yield
        finally:
            path.rmdir()
            path.with_suffix(".away").rename(path)
            engine.dispose()
        return
    name = sqlalchemy.make_url(url).database
    admin = sqlalchemy.create_engine(
        sqlalchemy.make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            connection.execute(
                sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
        engine.dispose()
        yield
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.dispose()
        engine.dispose()


async def test_a_database_away_gets_a_clear_503_and_static_files_still_load(
    services: BotServices, served: tuple[WebChatRoutes, TestServer], database_url: str
) -> None:
    _, server = served
    asha = await visitor(services, server, "asha")
    with database_away(services, database_url):
        page = await asha.client.get("/")
        assert page.status == 503
        assert await page.text() == text("en", "web.unavailable")
        assert page.headers["Retry-After"] == "5"
        sent = await asha.send("/quota")
        assert (sent.status, await sent.text()) == (503, text("en", "web.unavailable"))
        assert (await asha.client.get("/static/chat.css")).status == 200
    assert (await asha.client.get("/")).status == 200
    await asha.client.close()


async def test_unreadable_forms_and_cookies_get_a_clear_refusal(
    services: BotServices, served: tuple[WebChatRoutes, TestServer]
) -> None:
    _, server = served
    asha = await visitor(services, server, "asha")
    not_utf8 = await asha.client.post(
        "/press",
        data=b"data=s%3Aanime&under=&x=\xff",
        headers={
            "X-CSRF-Token": asha.csrf,
            "X-Requested-With": "fetch",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert (not_utf8.status, await not_utf8.text()) == (400, text("en", "web.bad_request"))
    # A sign-in whose nonce cookie is not UTF-8: refused, as any wrong nonce is.
    reader, writer = await asyncio.open_connection(server.host, server.port)
    form = b"nonce=abc"
    writer.write(
        b"POST /signin/" + b"A" * 43 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Cookie: chitrakar_signin=ab\xffc\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: " + str(len(form)).encode() + b"\r\n\r\n" + form
    )
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 403")
    writer.close()
    await asha.client.close()


async def test_a_result_whose_file_is_not_the_one_recorded_is_not_found(
    services: BotServices, served: tuple[WebChatRoutes, TestServer]
) -> None:
    """A result file changed on disk (or a corrupt download from object storage) is not
    shown: 404, as for a missing one, and an error in the log; not a 500."""
    _, server = served
    asha = await visitor(services, server, "asha")
    account = records.AccountView(asha.chat, "asha", False)
    origin = WebChat.origin(account, "en", None, trigger="button:corrupt01")
    accepted = services.intake.accept(origin, ImageRequest(Command.PORTRAIT, "a kite"))
    key = f"results/{accepted.job_id}/0.png"
    services.intake.artifacts.put(key, b"\x89PNG not what was recorded")
    with services.store.unit_of_work() as uow:
        assert jobs.start_job(uow, accepted.job_id, "worker-1") is not None
    with services.store.unit_of_work() as uow:
        jobs.record_results(uow, accepted.job_id, "worker-1", [key], ["0" * 64])
    shown = await asha.client.get(f"/images/{accepted.job_id}/0")
    assert shown.status == 404
    await asha.client.close()


def test_a_status_message_no_worker_will_look_for_is_removed(services: BotServices) -> None:
    """The job ended (cancelled from another tab) before its status message was recorded:
    the message goes at once, rather than say "Queued" for ever."""
    with services.store.unit_of_work() as uow:
        account = records.ensure_account(uow, "asha", False)
    chat = WebChat(services)
    origin = chat.origin(account, "en", None, trigger="button:ended0001")
    accepted = services.intake.accept(origin, ImageRequest(Command.PORTRAIT, "a kite"))
    assert services.intake.cancel(origin)
    chat._announce_and_dispatch(account, origin, accepted)
    assert not any(t.startswith("Queued") for t in chat_texts(services, account.id))
