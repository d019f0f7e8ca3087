"""The worker's HTTP port: ``/metrics`` (Prometheus), ``/healthz`` (liveness) and ``/readyz`` (readiness).

Served from a thread with the standard library's WSGI server (what prometheus-client itself uses), so that a
blocked event loop still gets an answer: liveness then fails instead of hanging. Readiness runs its checks on
the worker's loop through ``run_coroutine_threadsafe``. A web framework would add a dependency and a second
event loop for three GET routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from .health import Check, HealthProbe, Report
from .metrics import WorkerMetrics

logger = logging.getLogger(__name__)

StartResponse = Callable[..., Any]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log; errors still surface through the WSGI app."""


class ObservabilityServer:
    def __init__(self, probe: HealthProbe, metrics: WorkerMetrics, loop: asyncio.AbstractEventLoop, *, host: str = "127.0.0.1", port: int = 9480) -> None:
        self.probe = probe
        self.loop = loop
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._server = make_server(host, port, self._app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="pg-worker-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> ObservabilityServer:
        self._thread.start()
        logger.info("http_listening", extra={"event": "http_listening", "port": self.port, "paths": ["/metrics", "/healthz", "/readyz"]})
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _report(self, report: Report, start_response: StartResponse) -> Iterable[bytes]:
        body = json.dumps(report.as_dict()).encode()
        status = "200 OK" if report.ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return [body]

    def _readiness(self) -> Report:
        try:
            return asyncio.run_coroutine_threadsafe(self.probe.readiness(), self.loop).result(timeout=self.probe.check_timeout * 3)
        except Exception as exc:  # noqa: BLE001 - a stuck or closed loop is "not ready", with the reason
            return Report(False, [Check("event_loop", False, f"readiness checks did not complete: {type(exc).__name__}")])

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
            return [b""]
        if path == "/metrics":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            return self._report(self.probe.liveness(), start_response)
        if path == "/readyz":
            return self._report(self._readiness(), start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
        return [b"not found"]
