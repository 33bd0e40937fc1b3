"""The HTTP client python-telegram-bot talks to the Bot API with, in the bot and the workers.

python-telegram-bot's own client is httpx, which costs about 1.4 ms of CPU per request on the
benchmark machine against about 0.1 ms for aiohttp (already the web server's library): on
2 cores, that is a tenth of what the bot spends per command and a few ms of every job's
delivery. This implements python-telegram-bot's documented extension point (`BaseRequest`)
and sends exactly what `HTTPXRequest` sends: parameters as a form, files as multipart.

Timeouts keep python-telegram-bot's meaning where aiohttp has one: `connect_timeout` for a new
connection, `read_timeout` for each wait for the answer's bytes, `pool_timeout` plus
`connect_timeout` to obtain a connection (aiohttp counts both as one). aiohttp has no timeout
per write, and a deadline on the whole request would be tighter than httpx's (a 50 MB upload
on a slow link), so the write timeouts are not enforced: a stalled upload ends by the
kernel's TCP timeouts. As with httpx, redirects are not followed and the environment's proxy
settings (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`) apply; unlike httpx, `ALL_PROXY` does not.
They are read once per host, when the first request goes there, not per request: aiohttp's own
reading of them (`trust_env`) costs two thread hops a request, for every status message, long
poll and delivery (BENCHMARKS.md, "Commands taken in together"). Unlike `trust_env`, `~/.netrc`
is not read (the Bot API authenticates by the token in the URL; credentials for a proxy go in
its URL), and an `https://` proxy URL is used rather than skipped with a warning.
"""

from __future__ import annotations

import json
import urllib.request
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp.payload import BytesPayload
from telegram.error import NetworkError, TimedOut
from telegram.request import BaseRequest, RequestData

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# Connections kept to the Bot API; python-telegram-bot's default for its own client.
DEFAULT_POOL_SIZE = 256
# How much of an error page a NetworkError quotes.
QUOTED_PAGE_CHARS = 200


class AiohttpRequest(BaseRequest):
    """python-telegram-bot's requests sent with aiohttp. One instance serves one event loop
    (the session is made in `initialize`, on the loop that awaits it)."""

    __slots__ = (
        "_connect_timeout",
        "_pool_size",
        "_pool_timeout",
        "_proxies",
        "_read_timeout",
        "_session",
    )

    def __init__(
        self,
        connection_pool_size: int = DEFAULT_POOL_SIZE,
        read_timeout: float | None = 5.0,
        connect_timeout: float | None = 5.0,
        pool_timeout: float | None = 1.0,
    ) -> None:
        self._pool_size = connection_pool_size
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._session: aiohttp.ClientSession | None = None
        # (scheme, host, port) -> the proxy the environment names for it.
        self._proxies: dict[tuple[str, str | None, int | None], str | None] = {}

    @property
    def read_timeout(self) -> float | None:
        return self._read_timeout

    async def initialize(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size),
                headers={"User-Agent": self.USER_AGENT},
            )

    async def shutdown(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = BaseRequest.DEFAULT_NONE,
        write_timeout: Any = BaseRequest.DEFAULT_NONE,  # not enforced (see above)
        connect_timeout: Any = BaseRequest.DEFAULT_NONE,
        pool_timeout: Any = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        if self._session is None or self._session.closed:
            raise RuntimeError("This AiohttpRequest is not initialized")
        files = request_data.multipart_data if request_data else None
        fields = request_data.json_parameters if request_data else None
        read = self._chosen(read_timeout, self._read_timeout)
        connect = self._chosen(connect_timeout, self._connect_timeout)
        pool = self._chosen(pool_timeout, self._pool_timeout)
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None if pool is None or connect is None else pool + connect,
            sock_connect=connect,
            sock_read=read,
        )
        body: aiohttp.FormData | BytesPayload | None = None
        if fields is not None and not files:
            # Encoded here, as aiohttp's FormData would: given a dict, aiohttp first searches
            # its payload types for one (a search that fails and raises) before making a
            # FormData of it, about a tenth of a request's CPU here (BENCHMARKS.md).
            body = BytesPayload(urlencode(fields).encode(), content_type=FORM_CONTENT_TYPE)
        elif files:
            # File names as given, not percent-encoded (what httpx sends).
            body = aiohttp.FormData(fields or {}, quote_fields=False)
            for name, (file_name, content, mime_type) in files.items():
                body.add_field(name, content, filename=file_name, content_type=mime_type)
        try:
            async with self._session.request(
                method,
                url,
                data=body,
                timeout=timeout,
                allow_redirects=False,
                proxy=self._proxy_for(url),
            ) as answer:
                status, payload = answer.status, await answer.read()
        except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
            raise TimedOut from exc
        except aiohttp.ClientError as exc:
            raise NetworkError(f"aiohttp.{type(exc).__name__}: {exc}") from exc
        if status >= HTTPStatus.INTERNAL_SERVER_ERROR and not _is_json(payload):
            # A proxy's error page (a 502 or 504 from nginx in front of the Bot API), not
            # Telegram's answer. python-telegram-bot before 22.2 parses the body before it
            # looks at the status and raises a bare TelegramError, which callers take for a
            # refusal; later versions raise a NetworkError but log the page as an error with a
            # traceback. A NetworkError from here is retried like any 5xx.
            page = payload[:QUOTED_PAGE_CHARS].decode("utf-8", "replace")
            raise NetworkError(f"the Bot API answered {status} with a non-JSON body: {page!r}")
        return status, payload

    def _proxy_for(self, url: str) -> str | None:
        """The proxy `HTTP_PROXY` or `HTTPS_PROXY` names for the URL's scheme; None when there
        is none or `NO_PROXY` exempts the host."""
        parsed = urlsplit(url)
        key = (parsed.scheme, parsed.hostname, parsed.port)
        if key not in self._proxies:
            bypass = parsed.hostname is None or urllib.request.proxy_bypass(parsed.hostname)
            self._proxies[key] = None if bypass else urllib.request.getproxies().get(parsed.scheme)
        return self._proxies[key]

    @staticmethod
    def _chosen(given: Any, default: float | None) -> float | None:
        """A timeout passed to this call, or this client's own when it was left out."""
        return default if isinstance(given, type(BaseRequest.DEFAULT_NONE)) else given


def _is_json(payload: bytes) -> bool:
    try:
        json.loads(payload)
    except ValueError:  # UnicodeDecodeError included
        return False
    return True
