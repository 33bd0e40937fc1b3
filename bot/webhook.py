"""Telegram's webhook route, on the bot process's HTTP server.

The route only authenticates, parses and enqueues the update; the application's handlers do
the rest, exactly as in polling mode.
"""

from __future__ import annotations

import hmac
import json
import logging
from urllib.parse import urlsplit

from aiohttp import web
from telegram import Update

from bot.context import BotApplication

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 (a header name)
# Telegram's updates are small; anything larger is not from Telegram. (The server as a whole
# takes larger bodies: the web chat's photo uploads.)
MAX_UPDATE_BYTES = 1024 * 1024


def webhook_path(url: str) -> str:
    return urlsplit(url).path or "/"


async def _read_at_most(request: web.Request, limit: int) -> bytes:
    """The whole body, however it arrives; 413 as soon as it is over `limit`."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    return bytes(body)


def add_webhook_route(
    app: web.Application, application: BotApplication, url: str, secret: str
) -> None:
    expected = secret.encode()

    async def receive_update(request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER)
        if given is None:
            return web.Response(status=401, text="missing secret token")
        # aiohttp keeps undecodable header bytes as surrogates; encode them back, don't fail.
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            log.warning("webhook call with a wrong secret from %s", request.remote)
            return web.Response(status=403, text="wrong secret token")
        body = await _read_at_most(request, MAX_UPDATE_BYTES)
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("an update is a JSON object")
            update = Update.de_json(data, application.bot)
        except Exception as exc:
            # Whatever the shape (python-telegram-bot's parser raises all sorts on a body that
            # is JSON but no update): a 4xx stops Telegram from retrying what never parses.
            log.warning("unreadable webhook body: %s: %s", type(exc).__name__, exc)
            return web.Response(status=400, text="not a Telegram update")
        await application.update_queue.put(update)
        return web.Response(text="ok")

    app.router.add_post(webhook_path(url), receive_update)
