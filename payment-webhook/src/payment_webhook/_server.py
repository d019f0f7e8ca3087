"""Running the app on uvicorn with the service's limits, and ``/metrics`` on a port of its own when asked."""

from __future__ import annotations

import asyncio

import uvicorn
from fastapi import FastAPI

from ._app import create_app, create_metrics_app
from .settings import WebhookSettings


def uvicorn_config(app: FastAPI, settings: WebhookSettings, *, host: str | None = None, port: int | None = None) -> uvicorn.Config:
    """The one uvicorn configuration of the service (``serve`` and the tests use it alike).

    ``limit_concurrency`` bounds connections and requests in flight (beyond it uvicorn answers 503 at once), and
    ``timeout_keep_alive`` closes idle connections; the body's own deadline is enforced by the app (408).
    uvicorn's loggers go through the service's JSON/console renderer; access lines are left to the proxy.
    """
    return uvicorn.Config(
        app,
        host=host or settings.host,
        port=settings.port if port is None else port,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="on",
        timeout_keep_alive=settings.keep_alive_seconds,
        limit_concurrency=settings.max_connections,
    )


def metrics_config(app: FastAPI, settings: WebhookSettings, *, port: int | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        create_metrics_app(app),
        host=settings.metrics_host or settings.host,
        port=(settings.metrics_port or 0) if port is None else port,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="off",
        timeout_keep_alive=settings.keep_alive_seconds,
        limit_concurrency=20,
    )


async def serve(settings: WebhookSettings) -> None:
    """Serve until SIGINT/SIGTERM; with ``metrics_port`` set, a second server answers ``/metrics`` only.

    Whichever server stops first stops the other (uvicorn passes a captured signal on to the handler it
    replaced, so one SIGTERM reaches both).
    """
    app = create_app(settings)
    servers = [uvicorn.Server(uvicorn_config(app, settings))]
    if settings.metrics_port is not None:
        servers.append(uvicorn.Server(metrics_config(app, settings)))
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for server in servers:
            server.should_exit = True
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            # e.g. SystemExit(1) from uvicorn when a port is in use (it logged why)
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
