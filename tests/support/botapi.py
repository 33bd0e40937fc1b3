"""A Telegram Bot API emulator on loopback, for running the real bot and worker in tests.

It speaks the HTTP protocol python-telegram-bot speaks to api.telegram.org (form, multipart
and JSON requests; `{"ok": ..., "result": ...}` answers; long-polled getUpdates; file
downloads) for the methods Chitrakar uses. Tests play the users: they put updates in, then
wait for the calls the bot and the workers make.

The server runs on its own event loop in a background thread; the test-side methods are
thread-safe and blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

# Telegram's limits on a message's text and on a caption, in characters.
TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
# Values that stay strings even when they look like JSON ("42" as a prompt stays "42").
_STRING_FIELDS = {"text", "caption", "action", "language_code", "parse_mode", "file_id"}


@dataclass
class Call:
    """One Bot API request as the emulator received it."""

    method: str
    params: dict[str, Any]
    files: dict[str, bytes]
    result: Any = None
    at: float = field(default_factory=time.monotonic)


@dataclass
class Fault:
    status: int
    description: str
    retry_after: int | None
    times: int


class BotApiEmulator:
    def __init__(self, token: str = "123456:TEST-TOKEN", username: str = "chitrakar_test_bot"):
        self.token = token
        self.username = username
        self.bot_id = int(token.split(":")[0])
        self.calls: list[Call] = []
        self.commands: dict[str | None, list[dict[str, Any]]] = {}
        self.files: dict[str, bytes] = {}
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1000)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._file_ids = itertools.count(1)
        self._faults: dict[str, Fault] = {}
        self.webhook: dict[str, Any] | None = None
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._update_arrived: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """python-telegram-bot's `base_url`: the token is appended to it."""
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    def start(self) -> BotApiEmulator:
        started = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._update_arrived = asyncio.Event()
            self._loop.run_until_complete(self._start_server())
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup() if self._runner else _noop())
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="botapi-emulator", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the Bot API emulator did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _start_server(self) -> None:
        app = web.Application(client_max_size=60 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._handle_file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    # -- the test side: users act, tests wait ---------------------------------------------

    def user(
        self, user_id: int, first_name: str = "Asha", language_code: str | None = "en"
    ) -> dict[str, Any]:
        user: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": first_name}
        if language_code:
            user["language_code"] = language_code
        return user

    def private_chat(self, user: dict[str, Any]) -> dict[str, Any]:
        return {"id": user["id"], "type": "private", "first_name": user["first_name"]}

    def group_chat(self, chat_id: int, title: str = "Chai group") -> dict[str, Any]:
        return {"id": chat_id, "type": "supergroup", "title": title}

    def send_text(self, chat: dict[str, Any], user: dict[str, Any], text: str) -> dict[str, Any]:
        """A user sends a text message; returns the message as the bot will see it."""
        with self._lock:
            message = self.history_message(chat, user, text)
            self._push_update({"message": message})
            return message

    def offer_again(self, message: dict[str, Any]) -> None:
        """Offer a message the bot has seen once more, in a new update, as happens after a
        webhook retry or when Telegram starts update ids afresh."""
        with self._lock:
            self._push_update({"message": dict(message)})

    def edit_text(self, message: dict[str, Any], text: str) -> None:
        """The user edits a message they sent (Telegram sends an `edited_message` update)."""
        with self._lock:
            message["text"] = text
            message["edit_date"] = int(time.time())
            self._push_update({"edited_message": dict(message)})

    def delete_by_user(self, chat_id: int, message_id: int) -> None:
        with self._lock:
            self.messages[(chat_id, message_id)]["deleted"] = True

    def update_for(self, message: dict[str, Any]) -> dict[str, Any]:
        """An update carrying `message`, for posting to a webhook as Telegram would."""
        with self._lock:
            return {"update_id": next(self._update_ids), "message": message}

    def history_message(
        self, chat: dict[str, Any], user: dict[str, Any] | None, text: str
    ) -> dict[str, Any]:
        """A message already in the chat, sent before the bot was watching: no update."""
        with self._lock:
            message = self._new_message(chat, text=text, sender=user)
            if text.startswith("/"):
                command = text.split()[0]
                # Entity offsets and lengths count UTF-16 code units, as Telegram's do.
                length = len(command.encode("utf-16-le")) // 2
                message["entities"] = [{"type": "bot_command", "offset": 0, "length": length}]
            return message

    def calls_to(self, method: str, chat_id: int | None = None) -> list[Call]:
        with self._lock:
            return [
                c
                for c in self.calls
                if c.method == method and (chat_id is None or c.params.get("chat_id") == chat_id)
            ]

    def wait_for(
        self,
        method: str,
        predicate: Callable[[Call], bool] = lambda _c: True,
        timeout: float = 60.0,
    ) -> Call:
        """The first call to `method` that satisfies `predicate`, waiting for it if needed."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for call in self.calls:
                    if call.method == method and predicate(call):
                        return call
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(c.method, c.params) for c in self.calls[-15:]]
                    raise TimeoutError(f"no {method} call came in {timeout} s; last calls: {seen}")
                self._changed.wait(left)

    def fail(
        self,
        method: str,
        status: int = 400,
        description: str = "Bad Request: emulated failure",
        retry_after: int | None = None,
        times: int = 1,
    ) -> None:
        """Make the next `times` calls to `method` fail as Telegram would."""
        with self._lock:
            self._faults[method] = Fault(status, description, retry_after, times)

    # -- internals ------------------------------------------------------------------------

    def _new_message(
        self, chat: dict[str, Any], sender: dict[str, Any] | None = None, **fields: Any
    ) -> dict[str, Any]:
        chat_id = chat["id"]
        ids = self._message_ids.setdefault(chat_id, itertools.count(1))
        message = {
            "message_id": next(ids),
            "date": int(time.time()),
            "chat": chat,
            "from": sender or self._me(),
            **fields,
        }
        self.messages[(chat_id, message["message_id"])] = message
        return message

    def _push_update(self, content: dict[str, Any]) -> None:
        self._updates.append({"update_id": next(self._update_ids), **content})
        loop, event = self._loop, self._update_arrived
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)

    def _me(self) -> dict[str, Any]:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": "Chitrakar",
            "username": self.username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    def _chat(self, chat_id: int) -> dict[str, Any]:
        for (cid, _), message in self.messages.items():
            if cid == chat_id:
                return dict(message["chat"])
        return {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"}

    @staticmethod
    def _decode(key: str, value: str) -> Any:
        if key in _STRING_FIELDS:
            return value
        try:
            return json.loads(value)
        except ValueError:
            return value

    async def _read_request(self, request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        params: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        if request.content_type == "application/json":
            params = await request.json()
        elif request.content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                if part.filename is not None:
                    files[part.name or ""] = bytes(await part.read())
                else:
                    params[part.name or ""] = self._decode(part.name or "", await part.text())
        else:
            form = await request.post()
            params = {k: self._decode(k, str(v)) for k, v in form.items()}
        params.update({k: self._decode(k, v) for k, v in request.query.items()})
        return params, files

    async def _handle_method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
            )
        method = request.match_info["method"]
        params, files = await self._read_request(request)
        if method == "getUpdates":
            return web.json_response({"ok": True, "result": await self._get_updates(params)})
        with self._changed:
            fault = self._faults.get(method)
            if fault is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[method]
                self.calls.append(Call(method, params, files, result=fault))
                self._changed.notify_all()
                body: dict[str, Any] = {
                    "ok": False,
                    "error_code": fault.status,
                    "description": fault.description,
                }
                if fault.retry_after is not None:
                    body["parameters"] = {"retry_after": fault.retry_after}
                return web.json_response(body, status=fault.status)
            handler = getattr(self, f"_api_{method}", None)
            if handler is None:
                self.calls.append(Call(method, params, files))
                self._changed.notify_all()
                return web.json_response(
                    {"ok": False, "error_code": 404, "description": "Not Found: method not found"},
                    status=404,
                )
            try:
                result = handler(params, files)
            except ApiError as exc:
                self.calls.append(Call(method, params, files, result=exc))
                self._changed.notify_all()
                return web.json_response(
                    {"ok": False, "error_code": exc.status, "description": exc.description},
                    status=exc.status,
                )
            self.calls.append(Call(method, params, files, result=result))
            self._changed.notify_all()
        return web.json_response({"ok": True, "result": result})

    async def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        assert self._update_arrived is not None
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                # Asking from an offset confirms every update before it.
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
                pending = self._updates[:limit]
                self._update_arrived.clear()
            left = deadline - time.monotonic()
            if pending or left <= 0:
                return pending
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._update_arrived.wait(), left)

    def _message_in(self, chat_id: int, message_id: int) -> dict[str, Any]:
        message = self.messages.get((chat_id, message_id))
        if message is None or message.get("deleted"):
            raise ApiError(400, "Bad Request: message to edit not found")
        return message

    @staticmethod
    def _check_length(params: dict[str, Any], field: str, limit: int) -> None:
        if len(params.get(field) or "") > limit:
            raise ApiError(
                400, f"Bad Request: message {'caption ' if field == 'caption' else ''}is too long"
            )

    def _reply_target(self, chat_id: int, params: dict[str, Any]) -> dict[str, Any] | None:
        reply = params.get("reply_parameters")
        if not reply:
            return None
        target = self.messages.get((chat_id, int(reply["message_id"])))
        if target is not None and target.get("deleted"):
            target = None
        if target is None and not reply.get("allow_sending_without_reply"):
            raise ApiError(400, "Bad Request: message to be replied not found")
        return target

    def _store_photo(self, data: bytes) -> list[dict[str, Any]]:
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception as exc:
            raise ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED") from exc
        file_id = f"photo-{next(self._file_ids)}"
        self.files[file_id] = data
        return [
            {
                "file_id": file_id,
                "file_unique_id": f"u{file_id}",
                "width": width,
                "height": height,
                "file_size": len(data),
            }
        ]

    def _photo_bytes(self, value: Any, files: dict[str, bytes], name: str) -> bytes:
        if isinstance(value, str) and value.startswith("attach://"):
            value = files.get(value.removeprefix("attach://"))
        elif name in files:
            value = files[name]
        elif isinstance(value, str) and value in self.files:
            value = self.files[value]
        if not isinstance(value, bytes):
            raise ApiError(400, "Bad Request: there is no photo in the request")
        return value

    # -- Bot API methods ------------------------------------------------------------------

    def _api_getMe(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return self._me()

    def _api_deleteWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        self.webhook = None
        return True

    def _api_setWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        secret = params.get("secret_token")
        if secret is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", str(secret)):
            raise ApiError(400, "Bad Request: secret token contains unallowed characters")
        self.webhook = {"url": params["url"], "secret_token": secret}
        return True

    def _api_setMyCommands(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        self.commands[params.get("language_code") or None] = params["commands"]
        return True

    def _api_sendMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        chat_id = int(params["chat_id"])
        self._check_length(params, "text", TEXT_LIMIT)
        target = self._reply_target(chat_id, params)
        message = self._new_message(self._chat(chat_id), text=params["text"])
        if target is not None:
            message["reply_to_message"] = target
        return message

    def _api_editMessageText(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        message = self._message_in(int(params["chat_id"]), int(params["message_id"]))
        self._check_length(params, "text", TEXT_LIMIT)
        if message.get("text") == params["text"]:
            raise ApiError(400, "Bad Request: message is not modified")
        message["text"] = params["text"]
        message["edit_date"] = int(time.time())
        return message

    def _api_deleteMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        key = (int(params["chat_id"]), int(params["message_id"]))
        if key not in self.messages or self.messages[key].get("deleted"):
            raise ApiError(400, "Bad Request: message to delete not found")
        self.messages[key]["deleted"] = True
        return True

    def _api_sendChatAction(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    def _api_sendPhoto(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        chat_id = int(params["chat_id"])
        self._check_length(params, "caption", CAPTION_LIMIT)
        target = self._reply_target(chat_id, params)
        photo = self._store_photo(self._photo_bytes(params.get("photo"), files, "photo"))
        message = self._new_message(self._chat(chat_id), photo=photo)
        if params.get("caption"):
            message["caption"] = params["caption"]
        if target is not None:
            message["reply_to_message"] = target
        return message

    def _api_sendMediaGroup(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        chat_id = int(params["chat_id"])
        media = params["media"]
        if not 2 <= len(media) <= 10:
            raise ApiError(400, "Bad Request: wrong number of media in the group")
        target = self._reply_target(chat_id, params)
        group_id = f"group-{next(self._file_ids)}"
        sent = []
        for item in media:
            photo = self._store_photo(self._photo_bytes(item.get("media"), files, ""))
            message = self._new_message(self._chat(chat_id), photo=photo, media_group_id=group_id)
            if item.get("caption"):
                message["caption"] = item["caption"]
            if target is not None:
                message["reply_to_message"] = target
            sent.append(message)
        return sent

    def _api_getFile(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        file_id = params["file_id"]
        if file_id not in self.files:
            raise ApiError(400, "Bad Request: invalid file_id")
        return {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "file_size": len(self.files[file_id]),
            "file_path": f"photos/{file_id}.bin",
        }

    async def _handle_file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        file_id = request.match_info["path"].removeprefix("photos/").removesuffix(".bin")
        with self._lock:
            data = self.files.get(file_id)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")


class ApiError(Exception):
    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


async def _noop() -> None:
    return None
