"""Driving the real web chat over HTTP in tests: sign-in links from `chitrakar users invite`,
a signed-in client, and reading the chats' records."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from db import web
from db.session import Store
from db.web import MessageView
from tests.support.stack import chitrakar_process, run_chitrakar

CSRF_IN_PAGE = re.compile(r'data-csrf="([^"]+)"')


@dataclass(frozen=True)
class WebStack:
    base: str
    env: dict[str, str]
    data_dir: Path
    database_url: str


@contextmanager
def web_stack(env: dict[str, str], data_dir: Path) -> Iterator[WebStack]:
    """`chitrakar run` with this environment, once its web chat answers `/readyz`."""
    base = f"http://127.0.0.1:{env['CHITRAKAR_WEB_PORT']}"
    with chitrakar_process("run", env=env, log_dir=data_dir):
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the web chat did not start"
            time.sleep(0.2)
        yield WebStack(base, env, data_dir, f"sqlite:///{data_dir / 'chitrakar.db'}")


def invite(stack: WebStack, name: str, admin: bool = False) -> str:
    """A one-time sign-in link, as an admin makes one on the server."""
    args = ["users", "invite", name, *(["--admin"] if admin else [])]
    result = run_chitrakar(*args, env=stack.env, cwd=stack.data_dir)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def account_id(stack: WebStack, name: str) -> int:
    store = Store(stack.database_url)
    try:
        with store.unit_of_work() as uow:
            return next(a.id for a in web.accounts(uow) if a.name == name)
    finally:
        store.dispose()


class WebUser:
    """One person's browser, without the browser: cookies, the page's CSRF token, forms."""

    def __init__(self, stack: WebStack, name: str, admin: bool = False) -> None:
        self.stack = stack
        self.name = name
        self.http = httpx.Client(base_url=stack.base, timeout=30, follow_redirects=False)
        link = invite(stack, name, admin)
        self.http.get(link).raise_for_status()
        signed_in = self.http.post(link, data={"nonce": self.http.cookies["chitrakar_signin"]})
        assert signed_in.status_code == 303, signed_in.text
        page = self.http.get("/")
        assert page.status_code == 200, page.text
        match = CSRF_IN_PAGE.search(page.text)
        assert match is not None
        self.csrf = match.group(1)
        self.chat = account_id(stack, name)

    def send(
        self, line: str, photo: bytes | None = None, csrf: str | None = None
    ) -> httpx.Response:
        files = {"photo": ("selfie.jpg", photo, "image/jpeg")} if photo is not None else None
        return self.http.post(
            "/send",
            data={"text": line, "csrf": self.csrf if csrf is None else csrf},
            files=files,
            headers={"X-Requested-With": "fetch"},
        )

    def press(self, data: str, under: int, press_id: str | None = None) -> httpx.Response:
        form = {"data": data, "under": str(under), "csrf": self.csrf}
        if press_id is not None:
            form["press"] = press_id
        return self.http.post("/press", data=form, headers={"X-Requested-With": "fetch"})

    def messages(self) -> list[MessageView]:
        return chat_messages(self.stack.database_url, self.chat)

    def wait_for(self, found: Callable[[MessageView], bool], timeout: float = 60.0) -> MessageView:
        """The first message of this chat (shown or removed) that `found` accepts."""
        deadline = time.monotonic() + timeout
        while True:
            for message in chat_messages(self.stack.database_url, self.chat, deleted=True):
                if found(message):
                    return message
            if time.monotonic() > deadline:
                shown = [(m.id, m.from_bot, m.text[:80]) for m in self.messages()]
                raise AssertionError(f"no such message in {self.name}'s chat: {shown}")
            time.sleep(0.1)

    def answer_to(self, line: str, timeout: float = 60.0) -> MessageView:
        """The bot's first message replying to this user's message `line`, whatever it says by
        now: a job's status message is edited as soon as a worker starts it."""
        asked = self.wait_for(lambda m: not m.from_bot and m.text == line, timeout)
        return self.wait_for(lambda m: m.from_bot and m.reply_to == asked.id, timeout)

    def close(self) -> None:
        self.http.close()


def chat_messages(database_url: str, chat: int, deleted: bool = False) -> list[MessageView]:
    store = Store(database_url)
    try:
        with store.unit_of_work() as uow:
            if not deleted:
                return web.recent_messages(uow, chat, 1000)
            last = web.last_change_id(uow)
            ids = sorted({m for _, _, m in web.changes_after(uow, 0, chat, limit=last + 1)})
            return web.messages(uow, chat, ids)
    finally:
        store.dispose()
