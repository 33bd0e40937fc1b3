"""The aiohttp client python-telegram-bot uses in the bot and the workers, against the Bot API
emulator: what arrives is what python-telegram-bot's own client would send (forms, files,
albums), and failures surface as python-telegram-bot's errors, which callers retry on."""

from __future__ import annotations

import asyncio
import io
import socket
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import BodyPartReader, ClientSession, web
from PIL import Image
from telegram import (
    Bot,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    InputMediaPhoto,
    ReplyParameters,
)
from telegram.error import BadRequest, NetworkError, RetryAfter, TimedOut
from telegram.warnings import PTBDeprecationWarning

from chitrakar.bot_api_http import AiohttpRequest
from tests.support.botapi import BotApiEmulator


def png(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(out, "PNG")
    return out.getvalue()


@asynccontextmanager
async def serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[int]:
    """A server on loopback that answers every request with `handler`: its port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def bot_on(emulator: BotApiEmulator, request: AiohttpRequest) -> Bot:
    return Bot(
        emulator.token,
        base_url=emulator.base_url,
        base_file_url=emulator.base_file_url,
        request=request,
        get_updates_request=AiohttpRequest(connection_pool_size=1),
    )


@pytest.fixture
async def bot(emulator: BotApiEmulator) -> AsyncIterator[Bot]:
    async with bot_on(emulator, AiohttpRequest()) as bot:
        yield bot


async def test_parameters_arrive_as_python_telegram_bot_encodes_them(
    emulator: BotApiEmulator, bot: Bot
) -> None:
    assert bot.username == "chitrakar_test_bot"  # getMe, on initialize
    user = emulator.user(701)
    chat = emulator.private_chat(user)
    asked = emulator.send_text(chat, user, "/portrait a tea garden")
    buttons = InlineKeyboardMarkup([[InlineKeyboardButton("नया", callback_data="r:1:0")]])

    sent = await bot.send_message(
        chat["id"],
        "Queued. Your place in line: 1 — कतार",
        reply_parameters=ReplyParameters(asked["message_id"], allow_sending_without_reply=True),
        reply_markup=buttons,
    )

    call = emulator.wait_for("sendMessage")
    assert call.params["text"] == "Queued. Your place in line: 1 — कतार"
    assert call.params["reply_parameters"]["message_id"] == asked["message_id"]
    assert emulator.buttons_of(call.result) == [[{"text": "नया", "callback_data": "r:1:0"}]]
    # The answer is parsed as python-telegram-bot parses any: the reply is linked.
    assert sent.reply_to_message is not None
    assert sent.reply_to_message.message_id == asked["message_id"]


async def test_files_are_uploaded_whole_alone_and_as_an_album(
    emulator: BotApiEmulator, bot: Bot
) -> None:
    chat = emulator.private_chat(emulator.user(702))
    first, second, third = png("orange"), png("teal"), png("crimson")

    photo = await bot.send_photo(chat["id"], first, caption="तैयार है")
    album = await bot.send_media_group(
        chat["id"], [InputMediaPhoto(second), InputMediaPhoto(third, caption="two")]
    )

    assert photo.caption == "तैयार है"
    downloaded = [
        bytes(await (await bot.get_file(message.photo[-1].file_id)).download_as_bytearray())
        for message in (photo, *album)
    ]
    assert downloaded == [first, second, third]
    assert album[1].caption == "two"


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A server that records each request as it arrived and answers `true`, but redirects
    `/moved`: the URL of a bot on it, and the records."""
    seen: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        entry: dict[str, Any] = {
            "path": request.path,
            "content_type": request.content_type,
            "user_agent": request.headers.get("User-Agent", ""),
        }
        if request.content_type == "multipart/form-data":
            reader = await request.multipart()
            parts = []
            while (part := await reader.next()) is not None:
                assert isinstance(part, BodyPartReader)
                disposition = part.headers.get("Content-Disposition", "")
                parts.append((part.name, disposition, await part.read()))
            entry["parts"] = parts
        else:
            entry["form"] = dict(await request.post())
        seen.append(entry)
        if request.path.endswith("/moved"):
            raise web.HTTPFound("/elsewhere")
        return web.json_response({"ok": True, "result": True})

    async with serving(record) as port:
        yield f"http://127.0.0.1:{port}/bot", seen


async def test_what_goes_on_the_wire_is_what_python_telegram_bots_own_client_sends(
    recorder: tuple[str, list[dict[str, Any]]],
) -> None:
    base_url, seen = recorder
    request = AiohttpRequest()
    bot = Bot("1:x", base_url=base_url, request=request)
    await request.initialize()
    try:
        await bot.do_api_request("recordForm", api_kwargs={"chat_id": 5, "text": "नमस्ते"})
        await bot.do_api_request("recordEmpty")  # a method without parameters, as getMe
        photo = InputFile(png("orange"), filename="my photo तस्वीर.png")
        await bot.do_api_request("recordUpload", api_kwargs={"chat_id": 5, "document": photo})
        # A redirect is answered as it came, not followed (as with httpx).
        assert (await request.do_request(f"{base_url}1:x/moved", "POST"))[0] == 302
    finally:
        await request.shutdown()

    plain, empty, upload, moved = seen
    # Parameters as a form, each value JSON-encoded where it is not a string.
    assert plain["content_type"] == "application/x-www-form-urlencoded"
    assert plain["form"] == {"chat_id": "5", "text": "नमस्ते"}
    # No parameters: an empty form all the same.
    assert empty["content_type"] == "application/x-www-form-urlencoded"
    assert empty["form"] == {}
    assert plain["user_agent"].startswith("python-telegram-bot")
    # A file as multipart, its name as given, not percent-encoded.
    assert upload["content_type"] == "multipart/form-data"
    fields = {name: (disposition, data) for name, disposition, data in upload["parts"]}
    assert fields["chat_id"][1] == b"5"
    disposition, data = fields["document"]
    assert 'filename="my photo तस्वीर.png"' in disposition
    assert data == png("orange")
    assert len(seen) == 4 and moved["path"].endswith("/moved")


async def test_a_long_poll_waits_past_the_read_timeout(emulator: BotApiEmulator) -> None:
    # python-telegram-bot adds the poll's own timeout to the client's read timeout.
    updates_request = AiohttpRequest(connection_pool_size=1, read_timeout=0.2)
    bot = Bot(
        emulator.token,
        base_url=emulator.base_url,
        request=AiohttpRequest(),
        get_updates_request=updates_request,
    )
    async with bot:
        assert await bot.get_updates(timeout=1) == ()


async def test_an_api_error_is_python_telegram_bots_error(
    emulator: BotApiEmulator, bot: Bot
) -> None:
    chat = emulator.private_chat(emulator.user(703))
    emulator.fail("sendMessage", status=400, description="Bad Request: chat not found")
    with pytest.raises(BadRequest, match=r"[Cc]hat not found"):
        await bot.send_message(chat["id"], "hello")
    emulator.fail("sendMessage", status=429, description="Too Many Requests", retry_after=7)
    # python-telegram-bot warns that retry_after will become a timedelta: not this test's point.
    with pytest.raises(RetryAfter), warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        await bot.send_message(chat["id"], "hello")


async def test_a_slow_answer_times_out(emulator: BotApiEmulator) -> None:
    chat = emulator.private_chat(emulator.user(704))
    async with bot_on(emulator, AiohttpRequest(read_timeout=0.3)) as bot:
        emulator.delay("sendMessage", 2.0)
        with pytest.raises(TimedOut):
            await bot.send_message(chat["id"], "late")
        # A timeout given to the call wins over the client's own.
        emulator.delay("sendMessage", 0.6)
        sent = await bot.send_message(chat["id"], "in time", read_timeout=5)
        assert sent.text == "in time"


async def test_a_busy_pool_times_out_waiting_for_a_connection(emulator: BotApiEmulator) -> None:
    chat = emulator.private_chat(emulator.user(705))
    request = AiohttpRequest(connection_pool_size=1, pool_timeout=0.2, connect_timeout=0.1)
    async with bot_on(emulator, request) as bot:
        emulator.delay("sendMessage", 1.5)
        slow = asyncio.create_task(bot.send_message(chat["id"], "holds the one connection"))
        await asyncio.sleep(0.2)
        with pytest.raises(TimedOut):
            await bot.send_chat_action(chat["id"], "typing")
        assert (await slow).text == "holds the one connection"


async def test_the_environments_proxy_carries_requests_unless_no_proxy_exempts_the_host(
    emulator: BotApiEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY is honoured (read once per host, not by aiohttp per request), and NO_PROXY
    takes a host off it."""
    carried: list[str] = []

    async def forward(request: web.Request) -> web.Response:
        # A forward proxy is asked for the absolute URL.
        carried.append(str(request.url))
        headers = {"Content-Type": request.headers.get("Content-Type", "text/plain")}
        async with (
            ClientSession() as session,
            session.request(
                request.method, request.url, data=await request.read(), headers=headers
            ) as answer,
        ):
            return web.Response(
                status=answer.status, body=await answer.read(), content_type=answer.content_type
            )

    async with serving(forward) as port:
        # Lower case wins over upper case in urllib's reading of the environment.
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("no_proxy", "")
        async with bot_on(emulator, AiohttpRequest()) as bot:
            await bot.send_message(5, "through the proxy")
        assert any(url.endswith("/sendMessage") for url in carried)
        assert [call.params["text"] for call in emulator.calls_to("sendMessage", 5)] == [
            "through the proxy"
        ]

        carried.clear()
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        async with bot_on(emulator, AiohttpRequest()) as bot:
            await bot.send_message(5, "straight there")
        assert carried == []
        assert [call.params["text"] for call in emulator.calls_to("sendMessage", 5)] == [
            "through the proxy",
            "straight there",
        ]


async def test_an_unreachable_api_is_a_network_error_not_a_timeout() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once closed
    bot = Bot("1:x", base_url=f"http://127.0.0.1:{port}/bot", request=AiohttpRequest())
    request = bot.request
    await request.initialize()
    try:
        with pytest.raises(NetworkError) as failed:
            await bot.get_me()
        assert not isinstance(failed.value, TimedOut)
        assert "aiohttp.ClientConnectorError" in str(failed.value)
    finally:
        await request.shutdown()


async def test_a_request_before_initialize_or_after_shutdown_is_refused() -> None:
    request = AiohttpRequest()
    with pytest.raises(RuntimeError, match="not initialized"):
        await request.do_request("http://127.0.0.1:9/bot1:x/getMe", "POST")
    await request.initialize()
    await request.shutdown()
    with pytest.raises(RuntimeError, match="not initialized"):
        await request.do_request("http://127.0.0.1:9/bot1:x/getMe", "POST")
    await request.shutdown()  # twice is harmless
