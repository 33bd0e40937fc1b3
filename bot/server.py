"""The bot process: one asyncio loop running the Telegram bot (polling or webhook) when a
token is set, and one HTTP server for the web chat, the webhook and the health checks."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiohttp.web_log import AccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from sqlalchemy import text as sql

from bot.bootstrap import READINESS_TIMEOUT_S, BotServices, bootstrap
from chitrakar.config import Settings
from chitrakar.process import freeze_start_up_objects

if TYPE_CHECKING:
    # Telegram is loaded only when a token is set: the web chat alone needs none of it.
    from bot.context import BotApplication
    from bot.intake_process import IntakeProcess

log = logging.getLogger(__name__)

# The largest request body: a photo for /avatar (Telegram's own download limit, 20 MB) with
# the form around it. Each route may take less (a webhook update: 1 MB).
MAX_REQUEST_BYTES = 21 * 1024 * 1024


# Telegram's Bot API unreachable at start: seconds before the first try again, and the most
# between two tries (each wait twice the last).
TELEGRAM_RETRY_FIRST_S = 1.0
TELEGRAM_RETRY_MAX_S = 60.0

# The web chat's sign-in links: the path's last part is the secret (bot.web.server).
SIGN_IN_PREFIX = "/signin/"


class AccessLog(AccessLogger):
    """aiohttp's access log, without the secret of a sign-in link: an invitation stays
    valid until it is used, and whoever reads the logs must not be able to use it first."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if request.path.startswith(SIGN_IN_PREFIX):
            # A request whose body was read cannot be cloned: the line is told another path.
            request = cast(BaseRequest, _ShownAs(request, f"{SIGN_IN_PREFIX}(secret)"))
        super().log(request, response, time)


class _ShownAs:
    """A request as the access log sees it, with another path."""

    def __init__(self, request: BaseRequest, path: str) -> None:
        self._request, self.path, self.path_qs = request, path, path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def build_http_app(
    settings: Settings, services: BotServices, telegram: BotApplication | None
) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    add_health_routes(app, services)
    if telegram is not None and settings.telegram_webhook_url:
        from bot.webhook import add_webhook_route

        assert settings.telegram_webhook_secret is not None
        add_webhook_route(
            app,
            telegram,
            settings.telegram_webhook_url,
            settings.telegram_webhook_secret.get_secret_value(),
        )
    if settings.web_chat:
        from bot.web.server import add_web_chat

        add_web_chat(app, services)
    return app


def add_health_routes(app: web.Application, services: BotServices) -> None:
    """`/healthz`: the process answers. `/readyz`: the database and the broker answer too."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    def check_dependencies() -> None:
        with services.store.engine.connect() as connection:
            connection.execute(sql("select 1"))
        services.broker_ping()

    async def readyz(_: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(asyncio.to_thread(check_dependencies), READINESS_TIMEOUT_S)
        except Exception as exc:
            log.warning("not ready: %s", exc)
            return web.Response(status=503, text=f"not ready: {type(exc).__name__}")
        return web.Response(text="ready")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def run(settings: Settings) -> None:
    asyncio.run(serve(settings))


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT; then take no more updates and finish those taken in."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    services = bootstrap(settings)
    telegram: BotApplication | None = None
    if settings.telegram_token is not None:
        from bot.app import build_application

        telegram = build_application(settings, services)
    runner = web.AppRunner(build_http_app(settings, services, telegram), access_log_class=AccessLog)
    freeze_start_up_objects()
    try:
        await asyncio.to_thread(services.warm_up)
        if services.intake_process is not None:
            await _start_intake_process(services.intake_process)
        await runner.setup()
        try:
            # Several bot processes share the port; the kernel spreads connections over them.
            shared = settings.bot_processes > 1
            await web.TCPSite(
                runner, settings.web_host, settings.web_port, reuse_port=shared or None
            ).start()
        except OSError as exc:
            raise SystemExit(
                f"The web server cannot listen on {settings.web_host}:{settings.web_port}: "
                f"{exc.strerror or exc} (set CHITRAKAR_WEB_PORT to a free port)"
            ) from None
        if settings.web_chat:
            log.info("web chat on %s", settings.public_web_url)
        else:
            log.info("HTTP server (health checks) on %s:%s", settings.web_host, settings.web_port)
        if telegram is None:
            await stop.wait()
            log.info("stopping: no new requests; finishing those taken in")
        else:
            await _run_telegram(telegram, settings, stop, runner)
    finally:
        # Safe to repeat: a runner already cleaned up has nothing left to stop.
        await runner.cleanup()
        services.close()


async def _start_intake_process(intake_process: IntakeProcess) -> None:
    """Before the first update: its imports and connections would hold up the first
    commands, and one that cannot start should stop the bot, not each command."""
    try:
        pid = await asyncio.to_thread(intake_process.warm_up)
    except Exception as exc:
        raise SystemExit(
            f"The bot's intake process did not start ({type(exc).__name__}: {exc}); its log "
            "lines above say why. Or set CHITRAKAR_BOT_INTAKE_PROCESS=false."
        ) from None
    log.info("intake process %s is up", pid)


async def _run_telegram(
    application: BotApplication, settings: Settings, stop: asyncio.Event, runner: web.AppRunner
) -> None:
    """Until `stop`: then the HTTP server stops first (no more webhook updates or web chat
    requests; those in hand finish), then polling, then the handlers finish what they hold."""
    from telegram import Update

    if not await _connect_telegram(application, settings, stop):
        log.info("stopping: Telegram never answered")
        return
    async with application:
        await application.start()
        try:
            first = settings.bot_process_index == 0  # the others only take updates
            if settings.telegram_webhook_url and first:
                assert settings.telegram_webhook_secret is not None
                await application.bot.set_webhook(
                    settings.telegram_webhook_url,
                    secret_token=settings.telegram_webhook_secret.get_secret_value(),
                    allowed_updates=Update.ALL_TYPES,
                )
            elif not settings.telegram_webhook_url:
                assert application.updater is not None
                await application.updater.start_polling(
                    poll_interval=settings.telegram_poll_interval,
                    allowed_updates=Update.ALL_TYPES,
                )
            if application.post_init is not None and first:
                await application.post_init(application)
            await stop.wait()
            log.info("stopping: no new requests; finishing those taken in")
            await runner.cleanup()
        finally:
            if application.updater is not None and application.updater.running:
                await application.updater.stop()
            if application.running:
                await application.stop()


async def _connect_telegram(
    application: BotApplication, settings: Settings, stop: asyncio.Event
) -> bool:
    """Check the token with the Bot API (getMe). Refused: the bot stops, saying so in one
    line. Not reached: tried again with a growing back-off while the web chat serves, until
    it answers (True) or `stop` (False)."""
    from telegram.error import InvalidToken, NetworkError

    delay = TELEGRAM_RETRY_FIRST_S
    while True:
        try:
            await application.initialize()
            return True
        except InvalidToken:
            # The exception's text holds the token: it is left out.
            raise SystemExit(
                f"The Bot API ({settings.telegram_api_url}) refused CHITRAKAR_TELEGRAM_TOKEN: "
                "set the token @BotFather gave you, or unset it to serve the web chat alone."
            ) from None
        except NetworkError as exc:
            reason = str(exc).replace(application.bot.token, "(token)")
            log.warning(
                "the Bot API (%s) did not answer (%s: %s); trying again in %.0f s",
                settings.telegram_api_url,
                type(exc).__name__,
                reason,
                delay,
            )
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return False
        except TimeoutError:
            delay = min(delay * 2, TELEGRAM_RETRY_MAX_S)
