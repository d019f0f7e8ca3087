"""Storing an event and enqueueing its job in one transaction: both happen, or neither."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

import pg_worker

from . import _sql
from ._events import Event

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recorded:
    msg_id: int | None = None
    outcome: str = "duplicate"  # accepted | stored | ignored | unknown_service | duplicate (nothing written or enqueued)


@dataclass(frozen=True)
class Budget:
    """How long one request may spend in the database (each bound ends in a 503, never in a hung request)."""

    connect: float  # wait for a pool connection
    statement: float  # statement_timeout of the event's transaction
    lock: float  # lock_timeout of the event's transaction


class ServiceCheck:
    """Whether ``wl.service_exists(text)`` could be called, as last seen: logged when it changes (the webhook
    reads nothing else of wl-workers; without the function every service counts as existing)."""

    def __init__(self) -> None:
        self.callable: bool | None = None

    def seen(self, callable_now: bool) -> None:
        if callable_now != self.callable:
            self.callable = callable_now
            logger.info(
                "webhook_service_check",
                extra={"event": "webhook_service_check", "available": callable_now,
                       "detail": "unknown services are detected" if callable_now
                       else "wl.service_exists(text) cannot be called: every service counts as existing"},
            )


def _outcome(event: Event, known_service: bool) -> str:
    if not event.known:
        return "ignored"
    if not known_service:
        return "unknown_service"
    return "accepted" if event.job is not None else "stored"


async def record(
    pool: AsyncConnectionPool[Any], producer: pg_worker.AsyncProducer, event: Event, *, budget: Budget, services: ServiceCheck
) -> Recorded:
    """Insert the event under its unique (provider, event_id) and, when it is new, enqueue its job.

    The job is sent with pg-worker's producer on this transaction's connection, so an error anywhere (or a
    lost connection) rolls back both: a provider's retry then finds nothing and tries again from scratch.
    Concurrent deliveries of the same event serialise on the unique index: one inserts, the others wait for
    its commit and get no row back. An event for a service that does not exist is stored (outcome
    ``unknown_service``, for the operator) without a job: a device job for it could only dead-letter.

    The transaction is begun by hand, with its time budget and the service check in the same round trip
    (``_sql.begin_event``): as many round trips as before the budget existed.
    """
    async with pool.connection(timeout=budget.connect) as conn:
        cur = await conn.execute(_sql.begin_event(int(budget.statement * 1000), int(budget.lock * 1000)))
        try:
            while cur.nextset():  # BEGIN and the two SETs have no rows: the check's answer is the last result
                pass
            begun = await cur.fetchone()
            check_available = bool(begun and begun[0])
            services.seen(check_available)
            recorded = await _store_event(conn, producer, event, check_available=check_available)
            await conn.execute(_sql.COMMIT)
        except BaseException:
            await _rollback(conn)
            raise
        return recorded


async def _rollback(conn: psycopg.AsyncConnection[Any]) -> None:
    # Best effort: a broken connection is discarded by the pool, and one returned inside a transaction is
    # rolled back by the pool too. Nothing was committed either way.
    if conn.closed or conn.info.transaction_status == TransactionStatus.IDLE:
        return
    with contextlib.suppress(psycopg.Error):
        await conn.execute(_sql.ROLLBACK)


async def _store_event(
    conn: psycopg.AsyncConnection[Any], producer: pg_worker.AsyncProducer, event: Event, *, check_available: bool
) -> Recorded:
    known_service = True
    if check_available and event.job is not None and event.service_id is not None:
        cur = await conn.execute(_sql.SERVICE_EXISTS, (event.service_id,))
        row = await cur.fetchone()
        known_service = not (row is not None and row[0] is False)
    outcome = _outcome(event, known_service)
    cur = await conn.execute(
        _sql.INSERT_EVENT,
        {
            "provider": event.provider,
            "event_id": event.event_id,
            "type": event.type,
            "event_at": event.event_at,
            "payload": Jsonb(event.payload),
            "outcome": outcome,
            "amount": event.amount,
            "currency": event.currency,
            "service_id": event.service_id,
            "payment_id": event.payment_id,
        },
    )
    row = await cur.fetchone()
    if row is None:
        return Recorded()
    if event.job is None or outcome != "accepted":
        return Recorded(outcome=outcome)
    msg_id = await producer.enqueue(event.job.queue, event.job.payload, conn=conn)
    await conn.execute(_sql.SET_EVENT_JOB, {"queue": event.job.queue, "msg_id": msg_id, "id": row[0]})
    return Recorded(msg_id=msg_id, outcome=outcome)


async def ready(pool: AsyncConnectionPool[Any], *, connect_timeout: float) -> None:
    async with pool.connection(timeout=connect_timeout) as conn:
        await conn.execute(_sql.READY)


async def list_events(conninfo: str, *, outcome: str | None, since_seconds: float, limit: int) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        cur = await conn.execute(_sql.LIST_EVENTS, {"outcome": outcome, "since": since_seconds, "limit": limit})
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


async def prune(conn: psycopg.AsyncConnection[Any], *, older_than_days: int, batch: int = 5000) -> int:
    """Delete events received more than ``older_than_days`` ago, in batches; returns how many went."""
    total = 0
    while True:
        cur = await conn.execute(_sql.PRUNE_EVENTS, {"days": older_than_days, "batch": batch})
        total += cur.rowcount
        if cur.rowcount < batch:
            return total
