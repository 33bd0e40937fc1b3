"""A Telegram Bot API emulator on loopback, for running the real bot and worker in tests.

It speaks the HTTP protocol python-telegram-bot speaks to api.telegram.org (form, multipart
and JSON requests; `{"ok": ..., "result": ...}` answers; long-polled getUpdates; file
downloads) for the methods Chitrakar uses. Tests play the users: they put updates in
(texts, photos, documents, button presses), then wait for the calls the bot and the
workers make.

The server runs on its own event loop in a background thread; the test-side methods are
thread-safe and blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import mimetypes
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from aiohttp import BodyPartReader, web
from PIL import Image

# Telegram's limits on a message's text and on a caption, in characters.
TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
# The biggest file getFile lets a bot download, in bytes.
DOWNLOAD_LIMIT = 20 * 1024 * 1024
# The longest callback_data a button may carry, in bytes, and the longest callback answer.
CALLBACK_DATA_LIMIT = 64
ANSWER_TEXT_LIMIT = 200
# The boxes Telegram scales a user's photo down into; the photo as sent comes last.
_PHOTO_BOXES = (90, 320, 800, 1280)
# Values that stay strings even when they look like JSON ("42" as a prompt stays "42").
_STRING_FIELDS = {
    "text",
    "caption",
    "action",
    "language_code",
    "parse_mode",
    "file_id",
    "callback_query_id",
}
# What a chat administrator may do: the fields Bot API 9 makes required on one.
_ADMIN_RIGHTS = {
    "can_be_edited": False,
    "is_anonymous": False,
    "can_manage_chat": True,
    "can_delete_messages": True,
    "can_manage_video_chats": True,
    "can_restrict_members": True,
    "can_promote_members": False,
    "can_change_info": True,
    "can_invite_users": True,
    "can_post_stories": False,
    "can_edit_stories": False,
    "can_delete_stories": False,
    "can_pin_messages": True,
    "can_manage_topics": False,
}
# Bot API message fields that carry media, which a caption may go with.
_MEDIA_FIELDS = ("photo", "document", "video", "audio", "animation", "voice")


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
    chat_id: int | None = None  # only calls to this chat fail
    html: bool = False  # answered with a web page, not Telegram's JSON


class BotApiEmulator:
    def __init__(self, token: str = "123456:TEST-TOKEN", username: str = "chitrakar_test_bot"):
        self.token = token
        self.username = username
        self.bot_id = int(token.split(":")[0])
        self.calls: list[Call] = []
        self.commands: dict[str | None, list[dict[str, Any]]] = {}
        self.files: dict[str, bytes] = {}
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}
        # Each stored file's path for downloads, and the sizes tests declared for some.
        self._file_paths: dict[str, str] = {}
        self._path_files: dict[str, str] = {}
        self._declared_sizes: dict[str, int] = {}
        self._documents: dict[str, dict[str, Any]] = {}
        # Name and content type of each file part of the request being handled.
        self._uploads: dict[str, tuple[str | None, str | None]] = {}
        self._users: dict[int, dict[str, Any]] = {}
        self._admins: dict[int, list[int]] = {}
        self._creators: dict[int, int] = {}
        # Callback query id -> whether the bot has answered it.
        self._callback_queries: dict[str, bool] = {}
        self._pressed: dict[str, dict[str, Any]] = {}
        self._callback_ids = itertools.count(4_817_000_000_000_000_001)
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1000)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._file_ids = itertools.count(1)
        self._faults: dict[str, Fault] = {}
        # Groups that became supergroups: old chat id -> new chat id.
        self._migrations: dict[int, int] = {}
        self._delays: dict[str, float] = {}
        self._uplink_bytes_per_s: float | None = None
        self.webhook: dict[str, Any] | None = None
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._update_arrived: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
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
        self._stopping = False

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
            self._loop.call_soon_threadsafe(self._end)
            self._thread.join(10)

    def _end(self) -> None:
        # A long-polled getUpdates still open (its bot may be gone) answers now, or the
        # server's shutdown would wait for it: up to its timeout at the end of every test.
        assert self._loop is not None and self._update_arrived is not None
        self._stopping = True
        self._update_arrived.set()
        self._loop.stop()

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
        with self._lock:
            self._users[user_id] = user
        return user

    def private_chat(self, user: dict[str, Any]) -> dict[str, Any]:
        return {"id": user["id"], "type": "private", "first_name": user["first_name"]}

    def group_chat(self, chat_id: int, title: str = "Chai group") -> dict[str, Any]:
        return {"id": chat_id, "type": "supergroup", "title": title}

    def send_text(
        self,
        chat: dict[str, Any],
        user: dict[str, Any],
        text: str,
        reply_to: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A user sends a text message; returns the message as the bot will see it.

        With `reply_to` (any message of the chat), the message is a reply to that one."""
        with self._lock:
            message = self.history_message(chat, user, text)
            if reply_to is not None:
                message["reply_to_message"] = self._quoted(reply_to)
            self._push_update({"message": message})
            return message

    def send_photo(
        self,
        chat: dict[str, Any],
        user: dict[str, Any],
        data: bytes,
        caption: str | None = None,
        reply_to: dict[str, Any] | None = None,
        *,
        declared_size: int | None = None,
        media_group_id: str | None = None,
    ) -> dict[str, Any]:
        """A user sends a photo; returns the message as the bot will see it.

        As on Telegram, `photo` lists several sizes, smallest first: JPEG copies scaled into
        90, 320, 800 and 1280 pixel boxes (those smaller than the image), then the photo as
        sent, whose file holds exactly `data`. Bytes that are no image are kept all the same,
        as one size of 0 x 0. `declared_size` stands in for the largest size's `file_size`
        (getFile then refuses it over 20 MB, as for a file that big)."""
        with self._lock:
            fields: dict[str, Any] = {"photo": self._user_photo(data, declared_size)}
            fields.update(self._caption_fields(caption))
            message = self._user_message(chat, user, reply_to, media_group_id, fields)
            self._push_update({"message": message})
            return message

    def send_document(
        self,
        chat: dict[str, Any],
        user: dict[str, Any],
        data: bytes,
        file_name: str,
        mime_type: str,
        caption: str | None = None,
        reply_to: dict[str, Any] | None = None,
        *,
        declared_size: int | None = None,
        media_group_id: str | None = None,
    ) -> dict[str, Any]:
        """A user sends a file as a document; returns the message as the bot will see it.

        `declared_size` stands in for the document's `file_size` (getFile then refuses it over
        20 MB, as for a file that big)."""
        with self._lock:
            fields: dict[str, Any] = {
                "document": self._keep_document(data, file_name, mime_type, declared_size)
            }
            fields.update(self._caption_fields(caption))
            message = self._user_message(chat, user, reply_to, media_group_id, fields)
            self._push_update({"message": message})
            return message

    def send_animation(
        self,
        chat: dict[str, Any],
        user: dict[str, Any],
        data: bytes,
        caption: str | None = None,
        reply_to: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A user sends a GIF: Telegram delivers it as an MP4 `animation`, with the same file
        in `document` as well (for older clients)."""
        with self._lock:
            document = self._keep_document(data, "animation.gif.mp4", "video/mp4", None)
            animation = {
                **document,
                "width": 320,
                "height": 240,
                "duration": 2,
            }
            fields: dict[str, Any] = {"animation": animation, "document": document}
            fields.update(self._caption_fields(caption))
            message = self._user_message(chat, user, reply_to, None, fields)
            self._push_update({"message": message})
            return message

    def send_as_chat(
        self,
        chat: dict[str, Any],
        sender_chat: dict[str, Any],
        text: str,
        *,
        photo: bytes | None = None,
        automatic_forward: bool = False,
    ) -> dict[str, Any]:
        """A message sent on behalf of `sender_chat`, as Telegram delivers it: `text`, or a
        `photo` captioned `text`. `sender_chat` the group itself: an anonymous admin's, from
        GroupAnonymousBot; a channel: a post as that channel, from Channel_Bot, or with
        `automatic_forward` the linked channel's post forwarded, from Telegram (777000)."""
        if automatic_forward:
            sender = {"id": 777000, "is_bot": False, "first_name": "Telegram"}
        elif sender_chat["id"] == chat["id"]:
            sender = {"id": 1087968824, "is_bot": True, "first_name": "Group"}
            sender["username"] = "GroupAnonymousBot"
        else:
            sender = {"id": 136817688, "is_bot": True, "first_name": "Channel"}
            sender["username"] = "Channel_Bot"
        with self._lock:
            if photo is None:
                fields: dict[str, Any] = {"text": text}
                if text.startswith("/"):
                    fields["entities"] = self._command_entities(text)
            else:
                fields = {"photo": self._user_photo(photo, None), **self._caption_fields(text)}
            fields["sender_chat"] = sender_chat
            if automatic_forward:
                fields["is_automatic_forward"] = True
            message = self._user_message(chat, sender, None, None, fields)
            self._push_update({"message": message})
            return message

    def press(
        self,
        message: dict[str, Any],
        user: dict[str, Any],
        callback_data: str,
        *,
        check_button: bool = True,
    ) -> str:
        """A user presses an inline button of `message`; returns the callback query's id.

        The update carries the message as it is now (edits included). Unless `check_button`
        is false, the message must have a button with this `callback_data`."""
        with self._lock:
            key = (message["chat"]["id"], message["message_id"])
            stored = self.messages.get(key)
            if stored is None or stored.get("deleted"):
                raise ValueError(f"message {key} is not in the chat: no button to press")
            if check_button:
                data = [b.get("callback_data") for row in self.buttons_of(stored) for b in row]
                if callback_data not in data:
                    raise ValueError(
                        f"message {key} has no button with callback_data {callback_data!r}; "
                        f"its buttons carry {data}"
                    )
            query_id = str(next(self._callback_ids))
            self._callback_queries[query_id] = False
            self._users[user["id"]] = user
            update = {
                "callback_query": {
                    "id": query_id,
                    "from": user,
                    "message": self._public(stored),
                    "chat_instance": str(key[0] * 2_654_435_761 % 2**63),
                    "data": callback_data,
                }
            }
            self._pressed[query_id] = update
            self._push_update(update)
            return query_id

    def offer_press_again(self, query_id: str) -> None:
        """Deliver a button press's update once more (a webhook retry), with the same id."""
        with self._lock:
            self._push_update(dict(self._pressed[query_id]))

    def buttons_of(self, message: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """The inline keyboard of a message as it is stored now: rows of button dicts."""
        with self._lock:
            key = (message["chat"]["id"], message["message_id"])
            stored = self.messages.get(key, message)
            markup = stored.get("reply_markup") or {}
            return [[dict(button) for button in row] for row in markup.get("inline_keyboard", [])]

    def set_admins(self, chat_id: int, user_ids: Iterable[int], creator: int | None = None) -> None:
        """Make these users a chat's administrators (and `creator` its owner), replacing any
        set before; getChatMember and getChatAdministrators answer accordingly."""
        with self._lock:
            self._admins[chat_id] = [uid for uid in user_ids if uid != creator]
            if creator is None:
                self._creators.pop(chat_id, None)
            else:
                self._creators[chat_id] = creator

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
                message["entities"] = self._command_entities(text)
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

    def answers_to(self, callback_query_id: str) -> list[Call]:
        """The bot's answerCallbackQuery calls for this callback query, refused ones too."""
        with self._lock:
            return [
                c
                for c in self.calls
                if c.method == "answerCallbackQuery"
                and str(c.params.get("callback_query_id")) == callback_query_id
            ]

    def wait_for_answer(self, callback_query_id: str, timeout: float = 60.0) -> Call:
        """The bot's first answerCallbackQuery call for this callback query, waiting for it."""
        return self.wait_for(
            "answerCallbackQuery",
            lambda c: str(c.params.get("callback_query_id")) == callback_query_id,
            timeout=timeout,
        )

    def delay(self, method: str, seconds: float) -> None:
        """Answer calls to `method` `seconds` late (a slow Bot API), after recording them."""
        with self._lock:
            self._delays[method] = seconds

    def limit_uplink(self, bytes_per_s: float | None) -> None:
        """Take each request's uploaded files in as over a link of this speed (a bot's uplink
        to Telegram): the call is handled and recorded only once they would have come
        through. Each request on its own; None: at loopback speed."""
        with self._lock:
            self._uplink_bytes_per_s = bytes_per_s

    def fail(
        self,
        method: str,
        status: int = 400,
        description: str = "Bad Request: emulated failure",
        retry_after: int | None = None,
        times: int = 1,
        chat_id: int | None = None,
        html: bool = False,
    ) -> None:
        """Make the next `times` calls to `method` (in chat `chat_id`, when given) fail as
        Telegram would; with `html`, as a proxy in front of it would (nginx's error page)."""
        with self._lock:
            self._faults[method] = Fault(status, description, retry_after, times, chat_id, html)

    def migrate(
        self, chat_id: int, new_chat_id: int, by: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The group becomes a supergroup with a new id: from now on every call naming the old
        id is refused with 400 and `migrate_to_chat_id`, as Telegram does. With `by` (the
        admin who caused it), the bot is told as Telegram tells it: a service message in each
        chat. Returns the new chat."""
        supergroup = {"id": new_chat_id, "type": "supergroup", "title": "Chai supergroup"}
        with self._lock:
            self._migrations[chat_id] = new_chat_id
            if by is not None:
                old = {"id": chat_id, "type": "group", "title": "Chai group"}
                told = self._new_message(old, sender=by, migrate_to_chat_id=new_chat_id)
                self._push_update({"message": told})
                told = self._new_message(supergroup, sender=by, migrate_from_chat_id=chat_id)
                self._push_update({"message": told})
        return supergroup

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
        if sender is not None:
            self._users.setdefault(sender["id"], sender)
        return message

    def _user_message(
        self,
        chat: dict[str, Any],
        user: dict[str, Any],
        reply_to: dict[str, Any] | None,
        media_group_id: str | None,
        fields: dict[str, Any],
    ) -> dict[str, Any]:
        message = self._new_message(chat, sender=user, **fields)
        if media_group_id is not None:
            message["media_group_id"] = media_group_id
        if reply_to is not None:
            message["reply_to_message"] = self._quoted(reply_to)
        return message

    def _quoted(self, message: dict[str, Any]) -> dict[str, Any]:
        """A message as a reply carries it: as stored now, without its own reply."""
        stored = self.messages.get((message["chat"]["id"], message["message_id"]), message)
        return {k: v for k, v in self._public(stored).items() if k != "reply_to_message"}

    @staticmethod
    def _public(message: dict[str, Any]) -> dict[str, Any]:
        """A copy of a stored message without the emulator's own bookkeeping."""
        return {k: v for k, v in message.items() if k != "deleted"}

    @staticmethod
    def _command_entities(text: str) -> list[dict[str, Any]]:
        command = text.split()[0]
        # Entity offsets and lengths count UTF-16 code units, as Telegram's do.
        length = len(command.encode("utf-16-le")) // 2
        return [{"type": "bot_command", "offset": 0, "length": length}]

    def _caption_fields(self, caption: str | None) -> dict[str, Any]:
        if not caption:
            return {}
        fields: dict[str, Any] = {"caption": caption}
        if caption.startswith("/"):
            fields["caption_entities"] = self._command_entities(caption)
        return fields

    def _user_by_id(self, user_id: int) -> dict[str, Any]:
        if user_id == self.bot_id:
            return self._me()
        known = self._users.get(user_id)
        return known or {"id": user_id, "is_bot": False, "first_name": f"User {user_id}"}

    def _member(self, chat_id: int, user_id: int) -> dict[str, Any]:
        user = self._user_by_id(user_id)
        if self._creators.get(chat_id) == user_id:
            return {"status": "creator", "user": user, "is_anonymous": False}
        if user_id in self._admins.get(chat_id, []):
            return {"status": "administrator", "user": user, **_ADMIN_RIGHTS}
        return {"status": "member", "user": user}

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

    async def _read_request(
        self, request: web.Request
    ) -> tuple[dict[str, Any], dict[str, bytes], dict[str, tuple[str | None, str | None]]]:
        """The request's parameters, its files, and each file's name and content type."""
        params: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        uploads: dict[str, tuple[str | None, str | None]] = {}
        if request.content_type == "application/json":
            params = await request.json()
        elif request.content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.filename is not None:
                    files[part.name or ""] = bytes(await part.read())
                    uploads[part.name or ""] = (part.filename, part.headers.get("Content-Type"))
                else:
                    params[part.name or ""] = self._decode(part.name or "", await part.text())
        else:
            form = await request.post()
            params = {k: self._decode(k, str(v)) for k, v in form.items()}
        params.update({k: self._decode(k, v) for k, v in request.query.items()})
        return params, files, uploads

    async def _handle_method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
            )
        method = request.match_info["method"]
        params, files, uploads = await self._read_request(request)
        uplink = self._uplink_bytes_per_s
        if uplink and files:
            await asyncio.sleep(sum(len(data) for data in files.values()) / uplink)
        if method == "getUpdates":
            return web.json_response({"ok": True, "result": await self._get_updates(params)})
        with self._changed:
            fault = self._faults.get(method)
            if fault is not None and fault.chat_id not in (None, params.get("chat_id")):
                fault = None
            if fault is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[method]
                self.calls.append(Call(method, params, files, result=fault))
                self._changed.notify_all()
                if fault.html:
                    title = f"{fault.status} {fault.description}"
                    page = f"<html><head><title>{title}</title></head><body><h1>{title}</h1>"
                    return web.Response(
                        status=fault.status,
                        text=f"{page}<hr>nginx</body></html>",
                        content_type="text/html",
                    )
                body: dict[str, Any] = {
                    "ok": False,
                    "error_code": fault.status,
                    "description": fault.description,
                }
                if fault.retry_after is not None:
                    body["parameters"] = {"retry_after": fault.retry_after}
                return web.json_response(body, status=fault.status)
            moved_to = self._migrations.get(_int_or_none(params.get("chat_id")) or 0)
            if moved_to is not None:
                refusal = ApiError(400, "Bad Request: group chat was upgraded to a supergroup chat")
                self.calls.append(Call(method, params, files, result=refusal))
                self._changed.notify_all()
                return web.json_response(
                    {
                        "ok": False,
                        "error_code": refusal.status,
                        "description": refusal.description,
                        "parameters": {"migrate_to_chat_id": moved_to},
                    },
                    status=refusal.status,
                )
            handler = getattr(self, f"_api_{method}", None)
            if handler is None:
                self.calls.append(Call(method, params, files))
                self._changed.notify_all()
                return web.json_response(
                    {"ok": False, "error_code": 404, "description": "Not Found: method not found"},
                    status=404,
                )
            try:
                self._uploads = uploads
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
            delay = self._delays.get(method, 0.0)
        if delay:
            await asyncio.sleep(delay)
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
            if pending or left <= 0 or self._stopping:
                return pending
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._update_arrived.wait(), left)

    def _message_in(self, chat_id: int, message_id: int) -> dict[str, Any]:
        message = self.messages.get((chat_id, message_id))
        if message is None or message.get("deleted"):
            raise ApiError(400, "Bad Request: message to edit not found")
        return message

    def _editable(self, params: dict[str, Any]) -> dict[str, Any]:
        """The message an editMessage* call names; only the bot's own can be edited."""
        if "chat_id" not in params or "message_id" not in params:
            raise ApiError(400, "Bad Request: message identifier is not specified")
        message = self._message_in(int(params["chat_id"]), int(params["message_id"]))
        if message["from"]["id"] != self.bot_id:
            raise ApiError(400, "Bad Request: message can't be edited")
        return message

    @staticmethod
    def _inline_markup(params: dict[str, Any]) -> dict[str, Any] | None:
        """A request's inline keyboard, checked; Telegram's messages carry no other markup."""
        markup = params.get("reply_markup")
        if isinstance(markup, str):
            markup = json.loads(markup)
        if not isinstance(markup, dict) or "inline_keyboard" not in markup:
            return None
        for row in markup["inline_keyboard"]:
            for button in row:
                data = button.get("callback_data")
                if data is not None and not 1 <= len(str(data).encode()) <= CALLBACK_DATA_LIMIT:
                    raise ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
        return markup

    @staticmethod
    def _set_markup(message: dict[str, Any], markup: dict[str, Any] | None) -> None:
        # As on Telegram, an edit that carries no keyboard removes the one there was.
        if markup is None:
            message.pop("reply_markup", None)
        else:
            message["reply_markup"] = markup

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

    def _keep_file(
        self, data: bytes, prefix: str, folder: str, suffix: str, declared_size: int | None = None
    ) -> str:
        """Store a file; returns its file id. Its file path is `folder/<file id><suffix>`."""
        file_id = f"{prefix}-{next(self._file_ids)}"
        self.files[file_id] = data
        path = f"{folder}/{file_id}{suffix}"
        self._file_paths[file_id] = path
        self._path_files[path] = file_id
        if declared_size is not None:
            self._declared_sizes[file_id] = declared_size
        return file_id

    def _file_size(self, file_id: str) -> int:
        return self._declared_sizes.get(file_id, len(self.files[file_id]))

    def _photo_size(self, file_id: str, width: int, height: int) -> dict[str, Any]:
        return {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "width": width,
            "height": height,
            "file_size": self._file_size(file_id),
        }

    def _user_photo(self, data: bytes, declared_size: int | None) -> list[dict[str, Any]]:
        sizes: list[dict[str, Any]] = []
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                for copy, (w, h) in self._scaled_copies(image):
                    sizes.append(
                        self._photo_size(self._keep_file(copy, "photo", "photos", ".jpg"), w, h)
                    )
        except Exception:
            width = height = 0
        largest = self._keep_file(data, "photo", "photos", ".jpg", declared_size)
        return [*sizes, self._photo_size(largest, width, height)]

    @staticmethod
    def _scaled_copies(image: Image.Image) -> list[tuple[bytes, tuple[int, int]]]:
        """JPEG copies of an image scaled into each box smaller than it; none if it won't."""
        copies = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rgb = image.convert("RGBA").convert("RGB")
                for box in _PHOTO_BOXES:
                    if box >= max(image.size):
                        break
                    small = rgb.copy()
                    small.thumbnail((box, box))
                    out = io.BytesIO()
                    small.save(out, "JPEG", quality=80)
                    copies.append((out.getvalue(), small.size))
        except Exception:
            return []
        return copies

    def _keep_document(
        self, data: bytes, file_name: str, mime_type: str, declared_size: int | None = None
    ) -> dict[str, Any]:
        suffix = PurePosixPath(file_name).suffix
        file_id = self._keep_file(data, "doc", "documents", suffix, declared_size)
        document = {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "file_name": file_name,
            "mime_type": mime_type,
            "file_size": self._file_size(file_id),
        }
        self._documents[file_id] = document
        return dict(document)

    def _uploaded_document(self, value: Any, files: dict[str, bytes], name: str) -> dict[str, Any]:
        """The document a sendDocument call (or a media group item) sends: a new upload, or
        one sent before named by its file id."""
        if isinstance(value, str) and value in self._documents:
            return dict(self._documents[value])
        part = value.removeprefix("attach://") if isinstance(value, str) else name
        data = files.get(part)
        if data is None:
            raise ApiError(400, "Bad Request: there is no document in the request")
        if not data:
            raise ApiError(400, "Bad Request: file must be non-empty")
        file_name, content_type = self._uploads.get(part, (None, None))
        file_name = file_name or "document"
        if not content_type or content_type == "application/octet-stream":
            content_type = mimetypes.guess_type(file_name)[0] or "application/octet-stream"
        return self._keep_document(data, file_name, content_type)

    def _store_photo(self, data: bytes) -> list[dict[str, Any]]:
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception as exc:
            raise ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED") from exc
        file_id = self._keep_file(data, "photo", "photos", ".bin")
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
        markup = self._inline_markup(params)
        target = self._reply_target(chat_id, params)
        message = self._new_message(self._chat(chat_id), text=params["text"])
        if target is not None:
            message["reply_to_message"] = target
        self._set_markup(message, markup)
        return message

    def _api_editMessageText(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        message = self._editable(params)
        self._check_length(params, "text", TEXT_LIMIT)
        markup = self._inline_markup(params)
        if "text" not in message:
            raise ApiError(400, "Bad Request: there is no text in the message to edit")
        if message.get("text") == params["text"] and message.get("reply_markup") == markup:
            raise ApiError(400, "Bad Request: message is not modified")
        message["text"] = params["text"]
        self._set_markup(message, markup)
        message["edit_date"] = int(time.time())
        return message

    def _api_editMessageCaption(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        message = self._editable(params)
        self._check_length(params, "caption", CAPTION_LIMIT)
        markup = self._inline_markup(params)
        if not any(media in message for media in _MEDIA_FIELDS):
            raise ApiError(400, "Bad Request: there is no caption in the message to edit")
        caption = params.get("caption") or None
        if message.get("caption") == caption and message.get("reply_markup") == markup:
            raise ApiError(400, "Bad Request: message is not modified")
        message.pop("caption_entities", None)
        if caption is None:
            message.pop("caption", None)
        else:
            message["caption"] = caption
        self._set_markup(message, markup)
        message["edit_date"] = int(time.time())
        return message

    def _api_editMessageReplyMarkup(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        message = self._editable(params)
        markup = self._inline_markup(params)
        if message.get("reply_markup") == markup:
            raise ApiError(400, "Bad Request: message is not modified")
        self._set_markup(message, markup)
        return message

    def _api_answerCallbackQuery(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        query_id = str(params.get("callback_query_id"))
        # A query can be answered once; after that its id is no longer valid.
        if self._callback_queries.get(query_id) is not False:
            raise ApiError(
                400,
                "Bad Request: query is too old and response timeout expired or query ID is invalid",
            )
        if len(params.get("text") or "") > ANSWER_TEXT_LIMIT:
            raise ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        self._callback_queries[query_id] = True
        return True

    def _api_getChatMember(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return self._member(int(params["chat_id"]), int(params["user_id"]))

    def _api_getChatAdministrators(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        chat_id = int(params["chat_id"])
        if chat_id > 0:
            raise ApiError(400, "Bad Request: there are no administrators in the private chat")
        creator = self._creators.get(chat_id)
        ids = ([] if creator is None else [creator]) + self._admins.get(chat_id, [])
        return [self._member(chat_id, user_id) for user_id in ids]

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
        markup = self._inline_markup(params)
        target = self._reply_target(chat_id, params)
        photo = self._store_photo(self._photo_bytes(params.get("photo"), files, "photo"))
        message = self._new_message(self._chat(chat_id), photo=photo)
        if params.get("caption"):
            message["caption"] = params["caption"]
        if target is not None:
            message["reply_to_message"] = target
        self._set_markup(message, markup)
        return message

    def _api_sendDocument(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        chat_id = int(params["chat_id"])
        self._check_length(params, "caption", CAPTION_LIMIT)
        markup = self._inline_markup(params)
        target = self._reply_target(chat_id, params)
        document = self._uploaded_document(params.get("document"), files, "document")
        message = self._new_message(self._chat(chat_id), document=document)
        if params.get("caption"):
            message["caption"] = params["caption"]
        if target is not None:
            message["reply_to_message"] = target
        self._set_markup(message, markup)
        return message

    def _api_sendMediaGroup(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        chat_id = int(params["chat_id"])
        media = params["media"]
        if not 2 <= len(media) <= 10:
            raise ApiError(400, "Bad Request: wrong number of media in the group")
        for item in media:
            self._check_length(item, "caption", CAPTION_LIMIT)
        target = self._reply_target(chat_id, params)
        group_id = f"group-{next(self._file_ids)}"
        sent = []
        for item in media:
            content: dict[str, Any]
            if item.get("type") == "document":
                content = {"document": self._uploaded_document(item.get("media"), files, "")}
            else:
                content = {
                    "photo": self._store_photo(self._photo_bytes(item.get("media"), files, ""))
                }
            message = self._new_message(self._chat(chat_id), media_group_id=group_id, **content)
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
        # Bots may download files up to 20 MB: the file's own size or the size declared for it.
        size = self._file_size(file_id)
        if max(size, len(self.files[file_id])) > DOWNLOAD_LIMIT:
            raise ApiError(400, "Bad Request: file is too big")
        return {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "file_size": size,
            "file_path": self._file_paths[file_id],
        }

    async def _handle_file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        with self._lock:
            file_id = self._path_files.get(request.match_info["path"], "")
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


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
