"""The web chat's routes, on the bot process's HTTP server.

Routes only check who is asking (session cookie, CSRF token, size), turn the request into a
call on `WebChat` (in a thread: it blocks) and answer; pages follow their chat through
server-sent events. Every page is rendered on the server; a little JavaScript sends forms
without reloading and shows new messages, and the forms work without it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import jinja2
from aiohttp import web
from multidict import MultiDictProxy
from sqlalchemy import exc as database_errors

from bot.bootstrap import BotServices
from bot.server import SIGN_IN_PREFIX
from bot.web.chat import MAX_LINE_CHARS, WebChat
from bot.web.feed import ChangeFeed
from chitrakar.artifacts import ArtifactCorrupt, ArtifactMissing
from chitrakar.domain import MENU, Command, JobStatus
from chitrakar.photos import MAX_DOWNLOAD_BYTES
from chitrakar.texts import pick_language, text
from db import web as records
from db.web import CHANNEL, MessageView, SessionView

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SIGN_IN_COOKIE = "chitrakar_signin"
CSRF_HEADER = "X-CSRF-Token"
# Sent by the page's script: it wants JSON back, not a redirect.
FETCH_HEADER = "X-Requested-With"
# Messages a page opens with (older ones scroll out of the record's view).
PAGE_MESSAGES = 100
# A comment down an idle stream now and then keeps proxies from closing it.
KEEPALIVE_S = 15.0
GRID_NAME = re.compile(r"grid-[0-9a-f]{16}\.jpg")
SIGN_IN_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
# Forms without a file: nothing in them is near this size.
SMALL_BODY_BYTES = 64 * 1024
# How often an open stream checks that its session still stands.
SESSION_RECHECK_S = 10.0
# Ids in the database are 64-bit at most; anything longer is no id of ours.
MAX_ROW_ID = 2**63 - 1
# A running job's results are named once they may be shown; a cancelled job keeps those it
# had sent already.
SHOWN_STATUSES = frozenset({JobStatus.RUNNING, JobStatus.DONE, JobStatus.CANCELLED})
PRESS_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
SECURITY_HEADERS = {
    # Only this server's own scripts, styles and images; no framing; no referrer (a sign-in
    # link in the address bar must not travel to anyone).
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

# Requests that do work (a line sent, a button pressed) one account may have in progress at
# once. A page sends one line at a time, and may press a button meanwhile; more is a script or
# a flood, refused before its body is read.
CALLS_PER_ACCOUNT = 2
# Event streams one account may hold open at once: a tab each.
STREAMS_PER_ACCOUNT = 8
# How long a page refused a stream waits before it asks again, and a page whose stream
# dropped (the browser's own retry).
STREAM_REFUSED_RETRY_MS = 30_000
STREAM_RETRY_MS = 3_000
# The database is away (restarting, failing over, its connections dropped): a clear 503, and
# the page's script shows it and tries again.
DATABASE_AWAY = (
    database_errors.OperationalError,
    database_errors.InterfaceError,
    database_errors.TimeoutError,
)
RETRY_AFTER_S = 5
# Threads for the web chat's blocking work (database, decoding photos, finding faces): a pool
# of its own, so that however busy the web chat is, Telegram's handlers keep theirs.
WEB_CHAT_THREADS = 4

SESSION: web.RequestKey[SessionView | None] = web.RequestKey("chitrakar.session")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
P = ParamSpec("P")
R = TypeVar("R")


class StreamsFull(Exception):
    """An account holds as many event streams open as it may."""


class PerAccountLimit:
    """How many requests of one kind each account has in progress, up to a limit (in this
    process: each bot process counts its own)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[int] = Counter()

    @contextlib.contextmanager
    def held(self, account_id: int, refusal: Callable[[], Exception]) -> Iterator[None]:
        """One more for this account while the block runs; `refusal()` raised at the limit."""
        if self._held[account_id] >= self.limit:
            raise refusal()
        self._held[account_id] += 1
        try:
            yield
        finally:
            self._held[account_id] -= 1
            if not self._held[account_id]:
                del self._held[account_id]


class WebChatRoutes:
    def __init__(self, services: BotServices) -> None:
        self._services = services
        self._settings = services.settings
        self._chat = WebChat(services)
        self._feed = ChangeFeed(services.store)
        self.threads = ThreadPoolExecutor(WEB_CHAT_THREADS, thread_name_prefix="web-chat")
        self._calls = PerAccountLimit(CALLS_PER_ACCOUNT)
        self._streams = PerAccountLimit(STREAMS_PER_ACCOUNT)
        self._secure = self._settings.public_web_url.startswith("https://")
        # Browsers keep a Secure cookie only over https; "__Host-" pins it to this host.
        self._cookie = "__Host-chitrakar" if self._secure else "chitrakar_session"
        self._templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        # Static files' URLs carry a digest of their content: a new version is fetched anew.
        versions = {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            for path in (HERE / "static").iterdir()
        }
        self._templates.globals["static"] = lambda name: f"/static/{name}?v={versions[name]}"

    def add_to(self, app: web.Application) -> None:
        app.middlewares.append(self._middleware)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._stop)
        app.on_cleanup.append(self._close)
        router = app.router
        router.add_get("/", self.page)
        router.add_get(f"{SIGN_IN_PREFIX}{{token}}", self.sign_in_page)
        router.add_post(f"{SIGN_IN_PREFIX}{{token}}", self.sign_in)
        router.add_post("/signout", self.sign_out)
        router.add_post("/send", self.send)
        router.add_post("/press", self.press)
        router.add_get("/events", self.events)
        router.add_get(r"/images/{job:\d+}/{index:\d+}", self.image)
        router.add_get("/grids/{name}", self.grid)
        router.add_get("/export", self.export)
        router.add_static("/static", HERE / "static")

    async def _start(self, _: web.Application) -> None:
        await self._feed.start()

    async def _stop(self, _: web.Application) -> None:
        await self._feed.stop()

    async def _close(self, _: web.Application) -> None:
        # After the last request: the calls still running end before the process does.
        await asyncio.to_thread(self.threads.shutdown)

    async def _blocking(self, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a blocking call on the web chat's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.threads, functools.partial(call, *args, **kwargs))

    def _busy(self, request: web.Request) -> Callable[[], Exception]:
        return lambda: web.HTTPTooManyRequests(text=text(self._language(request), "web.busy"))

    # -- who is asking ----------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await self._answer(request, handler)
        except DATABASE_AWAY as exc:
            log.warning("web chat: %s answered 503, the database is away: %s", request.path, exc)
            raise web.HTTPServiceUnavailable(
                text=text(self._language(request), "web.unavailable"),
                headers={"Retry-After": str(RETRY_AFTER_S), **SECURITY_HEADERS},
            ) from None

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        secret = request.cookies.get(self._cookie)
        session = None
        # Static files are the same for everyone: no session to look up.
        if secret and not request.path.startswith("/static/"):
            session = await self._blocking(self._session_of, secret)
        request[SESSION] = session
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(SECURITY_HEADERS)
            raise
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
            if session is not None:
                # Pages and images of one person: never kept by a shared cache.
                response.headers.setdefault("Cache-Control", "private, no-store")
        return response

    def _session_of(self, secret: str) -> SessionView | None:
        with self._services.store.unit_of_work() as uow:
            return records.session_of(uow, secret)

    @staticmethod
    def _language(request: web.Request) -> str:
        accepted = request.headers.get("Accept-Language", "")
        return pick_language(accepted.split(",")[0].split(";")[0].strip() or None)

    def _signed_in(self, request: web.Request) -> SessionView:
        session = request[SESSION]
        if session is None:
            raise web.HTTPUnauthorized(text=text(self._language(request), "web.signed_out"))
        return session

    def _check_csrf(self, request: web.Request, session: SessionView, given: str | None) -> None:
        given = request.headers.get(CSRF_HEADER) or given or ""
        encoded = given.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(encoded, session.csrf_token.encode()):
            log.warning("web chat: a request without the right CSRF token from %s", request.remote)
            raise web.HTTPForbidden(text=text(self._language(request), "web.forbidden"))

    def _render(self, name: str, language: str, status: int = 200, **values: Any) -> web.Response:
        body = self._templates.get_template(name).render(
            t=lambda key, **params: text(language, key, **params),
            language=language,
            **values,
        )
        return web.Response(text=body, status=status, content_type="text/html")

    # -- pages ------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        language = self._language(request)
        session = request[SESSION]
        if session is None:
            return self._render("welcome.html", language, status=401)
        after, messages = await self._blocking(self._opening, session.account.id)
        return self._render(
            "chat.html",
            language,
            session=session,
            messages=messages,
            after=after,
            demo=self._settings.uses_demo_model,
            menu=_menu(language),
            max_upload=MAX_DOWNLOAD_BYTES,
        )

    def _opening(self, chat_id: int) -> tuple[int, list[MessageView]]:
        with self._services.store.unit_of_work() as uow:
            # The chat's feed position first: a change made meanwhile is shown twice, not lost.
            after = records.last_change_id(uow, chat_id)
            return after, records.recent_messages(uow, chat_id, PAGE_MESSAGES)

    def _message_html(self, message: MessageView, session: SessionView, language: str) -> str:
        template = self._templates.get_template("message.html")
        return template.render(
            m=message,
            session=session,
            t=lambda key, **params: text(language, key, **params),
        )

    # -- signing in and out -------------------------------------------------------------

    async def sign_in_page(self, request: web.Request) -> web.Response:
        """A button, not a sign-in: link previews and scanners open links, and must not use
        up a one-time link."""
        language = self._language(request)
        if not SIGN_IN_TOKEN.fullmatch(request.match_info["token"]):
            return self._render("link_invalid.html", language, status=404)
        nonce = secrets.token_urlsafe(24)
        response = self._render(
            "signin.html", language, token=request.match_info["token"], nonce=nonce
        )
        response.set_cookie(
            SIGN_IN_COOKIE,
            nonce,
            path="/signin",
            httponly=True,
            samesite="Strict",
            secure=self._secure,
            max_age=3600,
        )
        return response

    async def sign_in(self, request: web.Request) -> web.Response:
        language = self._language(request)
        if not SIGN_IN_TOKEN.fullmatch(request.match_info["token"]):
            return self._render("link_invalid.html", language, status=404)
        _small_body(request)
        form = await self._form(request)
        cookie = request.cookies.get(SIGN_IN_COOKIE, "").encode("utf-8", "surrogateescape")
        given = str(form.get("nonce", "")).encode("utf-8", "surrogateescape")
        # Double submit: only the page this server gave this browser can sign it in.
        if not cookie or not hmac.compare_digest(cookie, given):
            raise web.HTTPForbidden(text=text(language, "web.forbidden"))
        redeemed = await self._blocking(self._redeem, request.match_info["token"])
        if redeemed is None:
            return self._render("link_invalid.html", language, status=410)
        account, secret = redeemed
        log.info("web chat: %s signed in", account.name)
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            self._cookie,
            secret,
            path="/",
            httponly=True,
            samesite="Lax",
            secure=self._secure,
            max_age=int(timedelta(days=self._settings.web_session_days).total_seconds()),
        )
        response.del_cookie(SIGN_IN_COOKIE, path="/signin")
        raise response

    def _redeem(self, token: str) -> tuple[records.AccountView, str] | None:
        with self._services.store.unit_of_work() as uow:
            return records.redeem_sign_in_link(
                uow, token, timedelta(days=self._settings.web_session_days)
            )

    async def sign_out(self, request: web.Request) -> web.Response:
        session = self._signed_in(request)
        _small_body(request)
        form = await self._form(request)
        self._check_csrf(request, session, str(form.get("csrf", "")))
        secret = request.cookies.get(self._cookie, "")
        await self._blocking(self._end_session, secret)
        response = web.HTTPSeeOther("/")
        # A "__Host-" cookie is replaced only by one that is Secure too.
        response.set_cookie(
            self._cookie,
            "",
            path="/",
            max_age=0,
            httponly=True,
            samesite="Lax",
            secure=self._secure,
        )
        raise response

    def _end_session(self, secret: str) -> None:
        with self._services.store.unit_of_work() as uow:
            records.end_session(uow, secret)

    # -- talking ------------------------------------------------------------------------

    async def send(self, request: web.Request) -> web.StreamResponse:
        """A line typed, perhaps with a photo (for /avatar)."""
        session = self._signed_in(request)
        with self._calls.held(session.account.id, self._busy(request)):
            return await self._send(request, session)

    async def _send(self, request: web.Request, session: SessionView) -> web.StreamResponse:
        language = self._language(request)
        # Over the server's body limit aiohttp refuses with 413 before anything is kept.
        form = await self._form(request)
        self._check_csrf(request, session, str(form.get("csrf", "")))
        # Browsers send a form's line breaks as CRLF (a line typed with Shift+Enter).
        line = str(form.get("text", "")).replace("\r\n", "\n").replace("\r", "\n")
        if len(line) > MAX_LINE_CHARS:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_LINE_CHARS,
                actual_size=len(line),
                text=text(language, "web.too_long", limit=MAX_LINE_CHARS),
            )
        photo: bytes | None = None
        # The camera's and the gallery's inputs: the one that holds a file.
        for upload in form.getall("photo", []):
            if isinstance(upload, web.FileField):
                data = upload.file.read(MAX_DOWNLOAD_BYTES + 1)
                if len(data) > MAX_DOWNLOAD_BYTES:
                    raise web.HTTPRequestEntityTooLarge(
                        max_size=MAX_DOWNLOAD_BYTES,
                        actual_size=len(data),
                        text=text(
                            language, "photo.too_large", limit_mb=MAX_DOWNLOAD_BYTES // 2**20
                        ),
                    )
                photo = photo or data or None
        if not line.strip() and photo is None:
            return self._done(request, {})
        await self._blocking(self._chat.take_line, session.account, language, line, photo)
        return self._done(request, {})

    async def press(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        with self._calls.held(session.account.id, self._busy(request)):
            return await self._press(request, session)

    async def _press(self, request: web.Request, session: SessionView) -> web.StreamResponse:
        language = self._language(request)
        _small_body(request)
        form = await self._form(request)
        self._check_csrf(request, session, str(form.get("csrf", "")))
        under = _row_id(str(form.get("under", "")))
        press_id = str(form.get("press", ""))
        fetched = request.headers.get(FETCH_HEADER) == "fetch"
        answer = await self._blocking(
            self._chat.press,
            session.account,
            language,
            str(form.get("data", ""))[:64],
            under,
            press_id if PRESS_ID.fullmatch(press_id) else None,
            # A plain form shows no pop-up: the answer comes as a message instead.
            not fetched,
        )
        return self._done(
            request,
            {"notice": answer.notice, "alert": answer.alert, "reload": answer.reload},
        )

    async def _form(
        self, request: web.Request
    ) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
        """The request's form; 400 for a body that is no form (bytes that are not UTF-8, a
        broken multipart body)."""
        try:
            return await request.post()
        except ValueError as exc:  # UnicodeDecodeError among them
            log.info("web chat: an unreadable form from %s: %s", request.remote, exc)
            raise web.HTTPBadRequest(
                text=text(self._language(request), "web.bad_request")
            ) from None

    @staticmethod
    def _done(request: web.Request, answer: dict[str, Any]) -> web.StreamResponse:
        if request.headers.get(FETCH_HEADER) == "fetch":
            return web.json_response({"ok": True, **answer})
        raise web.HTTPSeeOther("/")  # a plain form (no script): back to the chat

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: each changed message of the chat, rendered, as it changes."""
        session = self._signed_in(request)
        try:
            with self._streams.held(session.account.id, StreamsFull):
                return await self._follow(request, session)
        except StreamsFull:
            return await self._refuse_stream(request)

    @staticmethod
    def _event_stream() -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: pass each event on at once
            }
        )
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _refuse_stream(self, request: web.Request) -> web.StreamResponse:
        """A stream over the account's limit: the page shows why, and its browser asks again
        after a while (when a tab may have been closed)."""
        response = self._event_stream()
        await response.prepare(request)
        notice = json.dumps(
            {
                "text": text(
                    self._language(request),
                    "web.too_many_tabs",
                    seconds=STREAM_REFUSED_RETRY_MS // 1000,
                )
            }
        )
        event = f"retry: {STREAM_REFUSED_RETRY_MS}\nevent: notice\ndata: {notice}\n\n"
        with contextlib.suppress(ConnectionResetError):
            await response.write(event.encode())
        return response

    async def _follow(self, request: web.Request, session: SessionView) -> web.StreamResponse:
        language = self._language(request)
        chat = session.account.id
        start = request.headers.get("Last-Event-ID") or request.query.get("after", "0")
        after = _row_id(start) or 0
        secret = request.cookies.get(self._cookie, "")
        response = self._event_stream()
        await response.prepare(request)
        woken = self._feed.subscribe(chat)
        checked = time.monotonic()
        try:
            # A browser refused a stream before waits long to reconnect: no longer.
            await response.write(f"retry: {STREAM_RETRY_MS}\n\n".encode())
            while not self._feed.closing.is_set():
                if time.monotonic() - checked > SESSION_RECHECK_S:
                    # Signed out (here or on another device) or expired: the stream ends.
                    if await self._blocking(self._session_of, secret) is None:
                        break
                    checked = time.monotonic()
                woken.clear()
                changes = await self._blocking(self._feed.changes, chat, after)
                if changes.cleared:
                    # /forget, perhaps in another tab: the page starts again from nothing.
                    await response.write(
                        f"id: {changes.last}\nevent: cleared\ndata: {{}}\n\n".encode()
                    )
                    break
                for number, message in enumerate(changes.messages, start=1):
                    payload = json.dumps(
                        {
                            "id": message.id,
                            "deleted": message.deleted,
                            "html": self._message_html(message, session, language),
                        }
                    )
                    # The id on the last of a batch: a page that reconnects resumes after it.
                    last = number == len(changes.messages)
                    event_id = f"id: {changes.last}\n" if last else ""
                    await response.write(f"{event_id}event: message\ndata: {payload}\n\n".encode())
                after = changes.last
                try:
                    await asyncio.wait_for(woken.wait(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
        except ConnectionResetError:
            pass  # the page was closed
        except DATABASE_AWAY as exc:
            # The stream ends; the browser asks again, and is told while the database is away.
            log.warning("web chat %s: a stream ended, the database is away: %s", chat, exc)
        finally:
            self._feed.unsubscribe(chat, woken)
        return response

    # -- images and files ---------------------------------------------------------------

    async def image(self, request: web.Request) -> web.Response:
        """One result image, for its owner only (404 to everyone else: not even whether it
        exists is told)."""
        session = self._signed_in(request)
        job_id, index = _row_id(request.match_info["job"]), _row_id(request.match_info["index"])
        png = None
        if job_id is not None and index is not None:
            png = await self._blocking(self._result, session, job_id, index)
        if png is None or index is None:
            raise web.HTTPNotFound(text=text(self._language(request), "web.not_found"))
        headers = {}
        if "download" in request.query:
            headers["Content-Disposition"] = (
                f'attachment; filename="chitrakar-{job_id}-{index + 1}.png"'
            )
        return web.Response(body=png, content_type="image/png", headers=headers)

    def _result(self, session: SessionView, job_id: int, index: int) -> bytes | None:
        intake = self._services.intake
        job = intake.find_job(job_id)
        # Results are named on a job only once they may be shown (past the content check);
        # a blocked job's stay for the admins' review, and a failed one's are not shown.
        if (
            job is None
            or job.channel != CHANNEL
            or job.requester != str(session.account.id)
            or job.status not in SHOWN_STATUSES
            or index >= len(job.result_paths)
        ):
            return None
        checksum = job.result_checksums[index] if index < len(job.result_checksums) else None
        try:
            return intake.artifacts.get(job.result_paths[index], checksum)
        except ArtifactMissing:
            return None
        except ArtifactCorrupt:
            log.error("job %s: result %s is not the file recorded; not shown", job_id, index)
            return None

    async def grid(self, request: web.Request) -> web.FileResponse:
        """The style preview grid (the same for everyone signed in)."""
        self._signed_in(request)
        name = request.match_info["name"]
        intake = self._services.intake
        folder = intake.media.grid_path(self._settings.model_label, intake.catalogue).parent
        path = folder / name
        if not GRID_NAME.fullmatch(name) or not path.is_file():
            raise web.HTTPNotFound(text=text(self._language(request), "web.not_found"))
        return web.FileResponse(path)

    async def export(self, request: web.Request) -> web.Response:
        """Everything stored about the user, as a ZIP (made when asked, kept nowhere)."""
        session = self._signed_in(request)
        language = self._language(request)
        archive = await self._blocking(
            self._services.privacy.export_zip,
            CHANNEL,
            str(session.account.id),
            text(language, "export.readme"),
        )
        if archive is None:
            raise web.HTTPNotFound(text=text(language, "export.nothing"))
        name = f"chitrakar-{session.account.id}.zip"
        return web.Response(
            body=archive,
            content_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )


def _row_id(value: str) -> int | None:
    """A database id from a URL or a form; None for anything else (too long included)."""
    if not value.isdecimal() or len(value) > 19 or int(value) > MAX_ROW_ID:
        return None
    return int(value)


def _small_body(request: web.Request) -> None:
    """A form with no file in it: refused at once when larger than any such form."""
    if request.content_length is None:
        raise web.HTTPLengthRequired()
    if request.content_length > SMALL_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(
            max_size=SMALL_BODY_BYTES, actual_size=request.content_length or 0
        )


def _menu(language: str) -> list[tuple[str, str]]:
    """The command chips above the composer: (command, what it does), as Telegram's menu."""
    return [(f"/{c}", text(language, f"menu.{c}")) for c in MENU if c != Command.START]


def add_web_chat(app: web.Application, services: BotServices) -> None:
    WebChatRoutes(services).add_to(app)
