"""The worker's health checks, for a service manager or a load balancer: `GET /healthz` (the
process answers and its heartbeat runs) and `GET /readyz` (the database and the broker answer,
and the model is loaded). A small HTTP server in a thread of its own, on
CHITRAKAR_WORKER_HEALTH_PORT (off when unset)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)


def serve_health(
    host: str, port: int, alive: Callable[[], bool], ready: Callable[[], None]
) -> ThreadingHTTPServer:
    """`ready` raises when something the worker needs does not answer."""

    class Checks(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._answer(200 if alive() else 503, "ok" if alive() else "heartbeat stopped")
            elif self.path == "/readyz":
                try:
                    ready()
                except Exception as exc:
                    self._answer(503, f"not ready: {type(exc).__name__}")
                    return
                self._answer(200, "ready")
            else:
                self._answer(404, "not found")

        def _answer(self, status: int, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("health check: " + format, *args)

    try:
        server = ThreadingHTTPServer((host, port), Checks)
    except OSError as exc:
        raise SystemExit(
            f"The worker's health checks cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    log.info("worker health checks on %s:%s", host, port)
    return server
