"""The FastAPI app: a factory whose typed lifespan owns the database pool; it verifies, records and enqueues.

Every request runs the same steps in the same order: size limit (413), signature and time window (401), JSON
and schema (400), then one transaction that stores the event and enqueues its job (503 when the database is
unavailable, so the provider retries). Nothing is stored before the signature is verified.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr
from starlette.requests import ClientDisconnect, Request

import pg_worker

from . import _store
from ._body import BodyError, read_limited
from ._events import Event, SchemaError, mercadopago_event, standard_event
from ._signatures import SignatureError, verify_mercadopago, verify_standard
from .metrics import WebhookMetrics, type_label
from .settings import WebhookSettings

logger = logging.getLogger(__name__)


class Rejected(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


@dataclass
class Service:
    """What the endpoints share; the pool exists between lifespan start and stop."""

    settings: WebhookSettings
    conninfo: str
    metrics: WebhookMetrics
    producer: pg_worker.AsyncProducer
    clock: Callable[[], float] = time.time
    standard_secrets: tuple[SecretStr, ...] = ()
    mercadopago_secrets: tuple[SecretStr, ...] = ()
    pool: AsyncConnectionPool[Any] | None = field(default=None, repr=False)

    def require_pool(self) -> AsyncConnectionPool[Any]:
        if self.pool is None:
            raise RuntimeError("the app is not running (its lifespan has not started)")
        return self.pool


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise Rejected(400, "malformed_json", "body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise Rejected(400, "malformed_json", f"body is not JSON (line {exc.lineno}, column {exc.colno})") from None


async def _read(request: Request, service: Service) -> bytes:
    try:
        return await read_limited(request, service.settings.max_body_bytes)
    except BodyError as exc:
        raise Rejected(exc.status, exc.reason, exc.detail) from None
    except ClientDisconnect:
        raise Rejected(400, "client_disconnected", "the client went away before sending the whole body") from None


async def _record(service: Service, event: Event) -> _store.Recorded:
    try:
        return await _store.record(service.require_pool(), service.producer, event, connect_timeout=service.settings.db_timeout_seconds)
    except psycopg.OperationalError as exc:  # includes the pool's timeout: no connection could be had
        raise Rejected(503, "database_unavailable", f"database unavailable: {type(exc).__name__}") from None
    except psycopg.Error as exc:
        raise Rejected(503, "database_error", f"database error: {type(exc).__name__} (sqlstate {exc.sqlstate})") from None


def _outcome(event: Event, recorded: _store.Recorded) -> tuple[int, str]:
    if not recorded.stored:
        return 200, "duplicate"
    if not event.known:
        return 202, "ignored"
    return 200, "accepted" if event.job is not None else "stored"


Outcome = tuple[int, str, Event, _store.Recorded]


class Endpoints:
    """The two webhook endpoints over one Service; each returns what happened or raises Rejected."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def standard(self, request: Request) -> Outcome:
        service = self.service
        if not service.standard_secrets:
            raise Rejected(404, "provider_disabled", "no Standard Webhooks secret is configured")
        body = await _read(request, service)
        try:
            event_id, _ts = verify_standard(
                service.standard_secrets, request.headers, body, now=service.clock(), tolerance=service.settings.standard_tolerance_seconds
            )
        except SignatureError as exc:
            raise Rejected(401, exc.reason, exc.detail) from None
        try:
            event = standard_event(event_id, _parse_json(body))
        except SchemaError as exc:
            raise Rejected(400, "schema", str(exc)) from None
        recorded = await _record(service, event)
        status, outcome = _outcome(event, recorded)
        return status, outcome, event, recorded

    async def mercadopago(self, request: Request) -> Outcome:
        service = self.service
        if not service.mercadopago_secrets:
            raise Rejected(404, "provider_disabled", "no Mercado Pago secret is configured")
        body = await _read(request, service)
        data_id = request.query_params.get("data.id") or None
        try:
            notified_at = verify_mercadopago(
                service.mercadopago_secrets,
                request.headers.get("x-signature", ""),
                request.headers.get("x-request-id", ""),
                data_id,
                now=service.clock(),
                window=service.settings.mercadopago_replay_window_seconds,
            )
        except SignatureError as exc:
            raise Rejected(401, exc.reason, exc.detail) from None
        try:
            event = mercadopago_event(data_id, request.query_params.get("type"), notified_at, _parse_json(body))
        except SchemaError as exc:
            raise Rejected(400, "schema", str(exc)) from None
        recorded = await _record(service, event)
        _status, outcome = _outcome(event, recorded)
        # Mercado Pago retries every answer but 200/201: an event it need not resend gets a 200.
        return 200, outcome, event, recorded


def _delivery_id(provider: str, request: Request) -> str:
    return request.headers.get("webhook-id" if provider == "standard" else "x-request-id", "")[:200]


async def _guarded(provider: str, request: Request, handler: Callable[[Request], Awaitable[Outcome]]) -> Outcome:
    """A bug must not escape unlogged and uncounted: it becomes a 500 (the provider retries)."""
    try:
        return await handler(request)
    except Rejected:
        raise
    except Exception as exc:
        logger.exception("webhook_failed", extra={"event": "webhook_failed", "provider": provider, "delivery_id": _delivery_id(provider, request)})
        raise Rejected(500, "internal_error", f"unexpected {type(exc).__name__}") from None


async def _handle(
    provider: str, request: Request, service: Service, handler: Callable[[Request], Awaitable[Outcome]]
) -> Response:
    started = time.perf_counter()
    try:
        status, outcome, event, recorded = await _guarded(provider, request, handler)
    except Rejected as exc:
        service.metrics.rejections.labels(provider, exc.reason).inc()
        level = logging.ERROR if exc.status >= 500 else logging.WARNING
        logger.log(
            level,
            "webhook_rejected",
            extra={"event": "webhook_rejected", "provider": provider, "reason": exc.reason, "status": exc.status,
                   "detail": exc.detail, "delivery_id": _delivery_id(provider, request)},
        )
        headers = {"Connection": "close"} if exc.status == 413 else None
        response: Response = JSONResponse({"status": "rejected", "reason": exc.reason}, status_code=exc.status, headers=headers)
    else:
        service.metrics.events.labels(provider, type_label(event.type), outcome).inc()
        if recorded.msg_id is not None and event.job is not None:
            service.metrics.jobs.labels(event.job.queue, str(event.job.payload["type"])).inc()
        logger.info(
            f"webhook_{outcome}",
            extra={"event": f"webhook_{outcome}", "provider": provider, "event_id": event.event_id, "type": event.type,
                   "queue": event.job.queue if event.job else None, "msg_id": recorded.msg_id},
        )
        response = JSONResponse({"status": outcome, "event_id": event.event_id}, status_code=status)
    service.metrics.duration.labels(provider, str(response.status_code)).observe(time.perf_counter() - started)
    return response


def create_app(
    settings: WebhookSettings,
    *,
    conninfo: str | None = None,
    producer: pg_worker.AsyncProducer | None = None,
    metrics: WebhookMetrics | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The webhook app. ``conninfo`` defaults to the settings' database URL; the pool opens with the app's
    lifespan without waiting for the database (``/readyz`` tells whether it is reachable)."""
    url = conninfo or settings.database_url
    if not url:
        raise ValueError("no database: set DATABASE_URL (or WEBHOOK_DATABASE_URL)")
    service = Service(
        settings=settings,
        conninfo=url,
        metrics=metrics or WebhookMetrics(),
        producer=producer or pg_worker.AsyncProducer(),
        clock=clock,
        standard_secrets=settings.standard_secret_list(),
        mercadopago_secrets=settings.mercadopago_secret_list(),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            kwargs={"autocommit": True},
            # A connection that died with the server (restart, failover) is replaced before it is handed out.
            check=AsyncConnectionPool.check_connection,
            timeout=settings.db_timeout_seconds,
            open=False,
            name="payment-webhook",
        )
        await pool.open(wait=False)
        service.pool = pool
        logger.info(
            "webhook_started",
            extra={"event": "webhook_started", "database": pg_worker.redact_url(url),
                   "standard_secrets": len(service.standard_secrets), "mercadopago_secrets": len(service.mercadopago_secrets)},
        )
        try:
            yield
        finally:
            service.pool = None
            await pool.close()

    app = FastAPI(title="payment-webhook", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    endpoints = Endpoints(service)

    @app.post("/webhooks/standard")
    async def standard(request: Request) -> Response:
        return await _handle("standard", request, service, endpoints.standard)

    @app.post("/webhooks/mercadopago")
    async def mercadopago(request: Request) -> Response:
        return await _handle("mercadopago", request, service, endpoints.mercadopago)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        try:
            await _store.ready(service.require_pool(), connect_timeout=min(2.0, settings.db_timeout_seconds))
        except (psycopg.Error, RuntimeError) as exc:
            logger.warning("webhook_not_ready", extra={"event": "webhook_not_ready", "error": type(exc).__name__})
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ready", "database": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
