"""The FastAPI app: a factory whose typed lifespan owns the database pool; it verifies, records and enqueues.

Every request runs the same steps in the same order: size and time limits (413, 408), signature and time window
(401), JSON, schema and the event's own time window (400), then one transaction that stores the event and
enqueues its job (503 when the database is unavailable or over its time budget, so the provider retries).
Nothing is stored before the signature is verified, and no invalid body reaches the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from psycopg import errors
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr
from starlette.requests import ClientDisconnect, Request

import pg_worker

from . import _store
from ._body import BodyError, parse_json, read_limited
from ._events import Event, SchemaError, TimeWindow, mercadopago_event, standard_event
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

    settings: WebhookSettings = field(repr=False)
    conninfo: str = field(repr=False)  # holds the database password
    metrics: WebhookMetrics = field(repr=False)
    producer: pg_worker.AsyncProducer = field(repr=False)
    clock: Callable[[], float] = time.time
    standard_secrets: tuple[SecretStr, ...] = ()
    mercadopago_secrets: tuple[SecretStr, ...] = ()
    pool: AsyncConnectionPool[Any] | None = field(default=None, repr=False)
    services: _store.ServiceCheck = field(default_factory=_store.ServiceCheck, repr=False)

    def require_pool(self) -> AsyncConnectionPool[Any]:
        if self.pool is None:
            raise RuntimeError("the app is not running (its lifespan has not started)")
        return self.pool

    @property
    def window(self) -> TimeWindow:
        s = self.settings
        return TimeWindow(timedelta(seconds=s.event_max_age_seconds), timedelta(seconds=s.event_max_ahead_seconds))

    @property
    def budget(self) -> _store.Budget:
        s = self.settings
        return _store.Budget(connect=s.db_timeout_seconds, statement=s.db_statement_timeout_seconds, lock=s.db_lock_timeout_seconds)

    def received_at(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)


def _parse_json(body: bytes) -> Any:
    try:
        return parse_json(body)
    except BodyError as exc:
        raise Rejected(exc.status, exc.reason, exc.detail) from None


async def _read(request: Request, service: Service) -> bytes:
    try:
        # A client that trickles its body must not hold a connection (and its buffers) for ever.
        async with asyncio.timeout(service.settings.body_timeout_seconds):
            return await read_limited(request, service.settings.max_body_bytes)
    except BodyError as exc:
        raise Rejected(exc.status, exc.reason, exc.detail) from None
    except ClientDisconnect:
        raise Rejected(400, "client_disconnected", "the client went away before sending the whole body") from None
    except TimeoutError:
        raise Rejected(408, "body_timeout", f"the body did not arrive within {service.settings.body_timeout_seconds:g} s") from None


# Over the per-transaction budget (statement_timeout, lock_timeout): the database works, this request was too slow.
_TIMEOUTS = (errors.QueryCanceled, errors.LockNotAvailable)


async def _record(service: Service, event: Event) -> _store.Recorded:
    try:
        return await _store.record(service.require_pool(), service.producer, event, budget=service.budget, services=service.services)
    except _TIMEOUTS as exc:
        raise Rejected(503, "database_timeout", f"database over its time budget: {type(exc).__name__}") from None
    except psycopg.OperationalError as exc:  # includes the pool's timeout: no connection could be had
        raise Rejected(503, "database_unavailable", f"database unavailable: {type(exc).__name__}") from None
    except psycopg.Error as exc:
        raise Rejected(503, "database_error", f"database error: {type(exc).__name__} (sqlstate {exc.sqlstate})") from None


_STANDARD_STATUS = {"ignored": 202, "duplicate": 200, "accepted": 200, "stored": 200, "unknown_service": 200}


Outcome = tuple[int, str, Event, _store.Recorded]


def _schema(exc: SchemaError) -> Rejected:
    return Rejected(400, exc.reason, str(exc))


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
            event = standard_event(event_id, _parse_json(body), received_at=service.received_at(), window=service.window)
        except SchemaError as exc:
            raise _schema(exc) from None
        recorded = await _record(service, event)
        # An unknown service is a 2xx: the billing system must not retry for ever what no retry can fix.
        return _STANDARD_STATUS[recorded.outcome], recorded.outcome, event, recorded

    async def mercadopago(self, request: Request) -> Outcome:
        service = self.service
        if not service.mercadopago_secrets:
            raise Rejected(404, "provider_disabled", "no Mercado Pago secret is configured")
        body = await _read(request, service)
        data_id = request.query_params.get("data.id") or None
        try:
            verified = verify_mercadopago(
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
            event = mercadopago_event(
                verified, request.query_params.get("type"), _parse_json(body), received_at=service.received_at(), window=service.window
            )
        except SchemaError as exc:
            raise _schema(exc) from None
        recorded = await _record(service, event)
        # Mercado Pago retries every answer but 200/201: an event it need not resend gets a 200.
        return 200, recorded.outcome, event, recorded


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
        # The rest of an oversized or trickling body is not worth reading: close the connection instead.
        headers = {"Connection": "close"} if exc.status in (408, 413) else None
        response: Response = JSONResponse({"status": "rejected", "reason": exc.reason}, status_code=exc.status, headers=headers)
    else:
        service.metrics.events.labels(provider, type_label(event.type), outcome).inc()
        if recorded.msg_id is not None and event.job is not None:
            service.metrics.jobs.labels(event.job.queue, str(event.job.payload["type"])).inc()
        # An event for a service we do not know is answered 2xx (no retry can fix it) but is an operator's matter.
        level = logging.WARNING if outcome == "unknown_service" else logging.INFO
        logger.log(
            level,
            f"webhook_{outcome}",
            extra={"event": f"webhook_{outcome}", "provider": provider, "event_id": event.event_id, "type": event.type,
                   "queue": event.job.queue if event.job else None, "msg_id": recorded.msg_id,
                   "service_id": event.service_id, "payment_id": event.payment_id},
        )
        response = JSONResponse({"status": outcome, "event_id": event.event_id}, status_code=status)
    service.metrics.duration.labels(provider, str(response.status_code)).observe(time.perf_counter() - started)
    return response


async def _prune_periodically(service: Service) -> None:
    """The retention job of the serve process: one prune at start-up, then every prune_interval_seconds.

    A failure is logged and counted, and the next round tries again: pruning must never stop the webhook.
    """
    settings = service.settings
    while True:
        try:
            async with service.require_pool().connection(timeout=settings.db_timeout_seconds) as conn:
                deleted = await _store.prune(conn, older_than_days=settings.retention_days)
        except (psycopg.Error, RuntimeError) as exc:
            service.metrics.prune_failures.inc()
            logger.warning("webhook_prune_failed", extra={"event": "webhook_prune_failed", "error": type(exc).__name__})
        else:
            service.metrics.pruned.inc(deleted)
            if deleted:
                logger.info("webhook_pruned", extra={"event": "webhook_pruned", "deleted": deleted, "older_than_days": settings.retention_days})
        await asyncio.sleep(settings.prune_interval_seconds)


def create_app(
    settings: WebhookSettings,
    *,
    conninfo: str | None = None,
    producer: pg_worker.AsyncProducer | None = None,
    metrics: WebhookMetrics | None = None,
    clock: Callable[[], float] = time.time,
    serve_metrics: bool | None = None,
) -> FastAPI:
    """The webhook app. ``conninfo`` defaults to the settings' database URL; the pool opens with the app's
    lifespan without waiting for the database (``/readyz`` tells whether it is reachable). ``/metrics`` is served
    here unless ``settings.metrics_port`` is set (then ``create_metrics_app`` serves it on its own port)."""
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

    async def reconnect_failed(_pool: AsyncConnectionPool[Any]) -> None:
        service.metrics.reconnect_failures.inc()
        logger.warning("webhook_db_reconnect_failed", extra={"event": "webhook_db_reconnect_failed",
                                                              "retry": "on the next request or readiness probe"})

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
            # The pool's reconnect backoff doubles without a cap; giving an attempt up early lets the next
            # request or probe start a fresh one at once (see the setting's comment).
            reconnect_timeout=settings.pool_reconnect_timeout_seconds,
            reconnect_failed=reconnect_failed,
            open=False,
            name="payment-webhook",
        )
        await pool.open(wait=False)
        service.pool = pool
        logger.info(
            "webhook_started",
            extra={"event": "webhook_started", "database": pg_worker.redact_url(url),
                   "standard_secrets": len(service.standard_secrets), "mercadopago_secrets": len(service.mercadopago_secrets),
                   "retention_days": settings.retention_days},
        )
        pruner = asyncio.create_task(_prune_periodically(service), name="webhook-prune") if settings.prune_interval_seconds > 0 else None
        try:
            yield
        finally:
            if pruner is not None:
                pruner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pruner
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

    if serve_metrics if serve_metrics is not None else settings.metrics_port is None:
        _add_metrics_route(app, service.metrics)
    return app


def _add_metrics_route(app: FastAPI, metrics: WebhookMetrics) -> None:
    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_metrics_app(app: FastAPI) -> FastAPI:
    """``/metrics`` of a webhook app, alone, for a port of its own (``WEBHOOK_METRICS_PORT``)."""
    service: Service = app.state.service
    metrics_app = FastAPI(title="payment-webhook metrics", docs_url=None, redoc_url=None, openapi_url=None)
    _add_metrics_route(metrics_app, service.metrics)
    return metrics_app
