"""Webhook mode: an aiohttp server that takes Telegram's updates and health checks.

The route only authenticates, parses and enqueues the update; the application's handlers do
the rest, exactly as in polling mode.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
from collections.abc import Callable
from urllib.parse import urlsplit

from aiohttp import web
from sqlalchemy import text as sql
from telegram import Update

from bot.context import BotApplication
from chitrakar.config import Settings
from db.session import Store

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 (a header name)
# Telegram's updates are small; anything larger is not from Telegram.
MAX_UPDATE_BYTES = 1024 * 1024
READINESS_TIMEOUT_S = 5.0


def webhook_path(url: str) -> str:
    return urlsplit(url).path or "/"


def build_web_app(
    application: BotApplication, settings: Settings, store: Store, broker_ping: Callable[[], None]
) -> web.Application:
    """`broker_ping` blocks, and raises when the broker cannot be reached."""
    assert settings.telegram_webhook_url and settings.telegram_webhook_secret
    secret = settings.telegram_webhook_secret.get_secret_value().encode()

    async def receive_update(request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER)
        if given is None:
            return web.Response(status=401, text="missing secret token")
        # aiohttp keeps undecodable header bytes as surrogates; encode them back, don't fail.
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret):
            log.warning("webhook call with a wrong secret from %s", request.remote)
            return web.Response(status=403, text="wrong secret token")
        # The whole body, however it arrives; over client_max_size aiohttp answers 413.
        body = await request.read()
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("an update is a JSON object")
            update = Update.de_json(data, application.bot)
        except (ValueError, TypeError, KeyError) as exc:
            # A 4xx stops Telegram from retrying something that will never parse.
            log.warning("unreadable webhook body: %s", exc)
            return web.Response(status=400, text="not a Telegram update")
        await application.update_queue.put(update)
        return web.Response(text="ok")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    def check_dependencies() -> None:
        with store.engine.connect() as connection:
            connection.execute(sql("select 1"))
        broker_ping()

    async def readyz(_: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(asyncio.to_thread(check_dependencies), READINESS_TIMEOUT_S)
        except Exception as exc:
            log.warning("not ready: %s", exc)
            return web.Response(status=503, text=f"not ready: {type(exc).__name__}")
        return web.Response(text="ready")

    app = web.Application(client_max_size=MAX_UPDATE_BYTES)
    app.router.add_post(webhook_path(settings.telegram_webhook_url), receive_update)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve_webhook(
    application: BotApplication, settings: Settings, store: Store, broker_ping: Callable[[], None]
) -> None:
    """Register the webhook, serve until SIGTERM or SIGINT, then finish what was taken in."""
    assert settings.telegram_webhook_url and settings.telegram_webhook_secret
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    runner = web.AppRunner(build_web_app(application, settings, store, broker_ping))
    try:
        async with application:
            await application.start()
            try:
                await runner.setup()
                try:
                    await web.TCPSite(runner, settings.web_host, settings.web_port).start()
                except OSError as exc:
                    raise SystemExit(
                        f"The webhook server cannot listen on {settings.web_host}:"
                        f"{settings.web_port}: {exc.strerror or exc}"
                    ) from None
                log.info("webhook server on %s:%s", settings.web_host, settings.web_port)
                await application.bot.set_webhook(
                    settings.telegram_webhook_url,
                    secret_token=settings.telegram_webhook_secret.get_secret_value(),
                    allowed_updates=Update.ALL_TYPES,
                )
                if application.post_init is not None:
                    await application.post_init(application)
                await stop.wait()
                log.info("stopping: no new updates; finishing those taken in")
            finally:
                await runner.cleanup()
                if application.running:
                    await application.stop()
    finally:
        if application.post_shutdown is not None:
            await application.post_shutdown(application)
