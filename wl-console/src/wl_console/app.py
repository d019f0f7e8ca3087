"""The console app: ``create_app(settings, *, clock=...)``, whose typed lifespan owns the database pool.

Every request goes through the same layers, outermost first: timing (``Server-Timing``, the per-route
histogram), security headers, CSRF (unsafe methods), then the route, whose declared permission is checked
before the view runs. Errors end as pages: 303 to the login page (not signed in, GET), 401/403/404, and 503
when the database cannot be reached. Templates autoescape everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from psycopg_pool import AsyncConnectionPool
from starlette.exceptions import HTTPException as StarletteHTTPException

import pg_worker

from . import _sql
from .metrics import ConsoleMetrics
from .security import ASGIApp, CSRFMiddleware, Message, Receive, Scope, SecurityHeaders, Send
from .sessions import Signer
from .settings import ConsoleSettings
from .views import auth, customers, payments, queues, routers
from .web import Console, Forbidden, NotFound, NotSignedIn, login_redirect, render

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# Routes that need no sign-in (the route-table test checks that every other route declares a permission).
PUBLIC_ROUTES = frozenset({("GET", "/"), ("GET", "/login"), ("POST", "/login"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")})


def _templates() -> Environment:
    env = Environment(loader=PackageLoader("wl_console", "templates"), autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = lambda value: "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC") if hasattr(value, "strftime") else str(value)
    env.filters["age"] = _age
    return env


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Timing:
    """Server time per request: a ``Server-Timing`` header (what bench/console_bench.py reads) and a histogram."""

    def __init__(self, app: ASGIApp, metrics: ConsoleMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = time.perf_counter() - started
                route = scope.get("route")
                self.metrics.duration.labels(getattr(route, "path", "-")).observe(elapsed)
                message["headers"] = [*message.get("headers", []), (b"server-timing", f"app;dur={elapsed * 1000:.1f}".encode())]
            await send(message)

        await self.app(scope, receive, timed)


def create_app(settings: ConsoleSettings, *, conninfo: str | None = None, clock: Callable[[], float] = time.time,
               metrics: ConsoleMetrics | None = None) -> FastAPI:
    """The console. ``conninfo`` defaults to the settings' database URL; the pool opens with the lifespan
    without waiting for the database (``/readyz`` tells whether it is reachable and migrated)."""
    url = conninfo or settings.database_url
    if not url:
        raise ValueError("no database: set DATABASE_URL (or WL_CONSOLE_DATABASE_URL)")
    console = Console(settings=settings, signer=Signer(settings.signing_key()), metrics=metrics or ConsoleMetrics(), templates=_templates(), clock=clock)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            # No server-side prepared statements: each search is planned with its own values, so a LIKE 'prefix%'
            # can use the text_pattern_ops indexes (a generic plan cannot); it also suits PgBouncer.
            url, min_size=settings.pool_min_size, max_size=settings.pool_max_size, kwargs={"autocommit": True, "prepare_threshold": None},
            check=AsyncConnectionPool.check_connection, timeout=settings.db_timeout_seconds, open=False, name="wl-console",
        )
        await pool.open(wait=False)
        console.pool = pool
        logger.info("console_started", extra={"event": "console_started", "database": pg_worker.redact_url(url)})
        try:
            yield
        finally:
            console.pool = None
            await pool.close()

    app = FastAPI(title="wl-console", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console
    for module in (auth, customers, routers, payments, queues):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_health(app, console)
    _add_error_pages(app, console)
    app.add_middleware(CSRFMiddleware, signer=console.signer, metrics=console.metrics, max_body=settings.max_form_bytes)
    app.add_middleware(SecurityHeaders, hsts=settings.cookie_secure)
    app.add_middleware(Timing, metrics=console.metrics)
    return app


def _add_health(app: FastAPI, console: Console) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        try:
            async with console.connection() as conn:
                await conn.execute(_sql.READY)
        except (psycopg.Error, RuntimeError) as exc:
            logger.warning("console_not_ready", extra={"event": "console_not_ready", "error": type(exc).__name__})
            return JSONResponse({"status": "unavailable", "database": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready", "database": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(console.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_error_pages(app: FastAPI, console: Console) -> None:
    def page(request: Request, status: int, title: str, text: str) -> Response:
        return render(request, "error.html", {"title": title, "text": text}, status=status)

    @app.exception_handler(NotSignedIn)
    async def not_signed_in(request: Request, _exc: NotSignedIn) -> Response:
        if request.method in ("GET", "HEAD"):
            return login_redirect(request)
        return page(request, 401, "Not signed in", "Your session has ended: sign in again.")

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        return page(request, 403, "Not allowed", f"Your role does not allow this ({exc.permission}).")

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> Response:
        return page(request, 404, "Not found", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return page(request, exc.status_code, "Not found" if exc.status_code == 404 else "Error", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, _exc: RequestValidationError) -> Response:
        console.metrics.refusals.labels("bad_input").inc()
        return page(request, 400, "Bad request", "The address is not valid.")

    @app.exception_handler(psycopg.Error)
    async def database_error(request: Request, exc: psycopg.Error) -> Response:
        console.metrics.errors.labels(type(exc).__name__).inc()
        if isinstance(exc, psycopg.OperationalError):  # includes the pool's timeout: no connection to be had
            logger.error("console_database_unavailable", extra={"event": "console_database_unavailable", "error": type(exc).__name__, "path": request.url.path})
            return page(request, 503, "Database unavailable", "The database cannot be reached right now; try again in a moment.")
        # A schema older than this console expects (a package not migrated yet), or a bug: logged in full, shown short.
        logger.error("console_database_error", extra={"event": "console_database_error", "error": type(exc).__name__, "sqlstate": exc.sqlstate,
                                                      "detail": str(exc).strip()[:500], "path": request.url.path})
        return page(request, 500, "Database error", f"The database refused the query ({type(exc).__name__}); the details are in the console's log.")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        console.metrics.errors.labels(type(exc).__name__).inc()
        logger.exception("console_error", extra={"event": "console_error", "error": type(exc).__name__, "path": request.url.path})
        return page(request, 500, "Error", "Something went wrong on our side; the details are in the console's log.")
