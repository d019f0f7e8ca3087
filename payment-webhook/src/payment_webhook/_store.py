"""Storing an event and enqueueing its job in one transaction: both happen, or neither."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

import pg_worker

from . import _sql
from ._events import Event


@dataclass(frozen=True)
class Recorded:
    stored: bool  # False: a duplicate of an event already stored (nothing was written or enqueued)
    msg_id: int | None = None


async def record(pool: AsyncConnectionPool[Any], producer: pg_worker.AsyncProducer, event: Event, *, connect_timeout: float) -> Recorded:
    """Insert the event under its unique (provider, event_id) and, when it is new, enqueue its job.

    The job is sent with pg-worker's producer on this transaction's connection, so an error anywhere (or a
    lost connection) rolls back both: a provider's retry then finds nothing and tries again from scratch.
    Concurrent deliveries of the same event serialise on the unique index: one inserts, the others wait for
    its commit and get no row back.
    """
    async with pool.connection(timeout=connect_timeout) as conn, conn.transaction():
        cur = await conn.execute(
            _sql.INSERT_EVENT,
            {
                "provider": event.provider,
                "event_id": event.event_id,
                "type": event.type,
                "event_at": event.event_at,
                "payload": Jsonb(event.payload),
            },
        )
        row = await cur.fetchone()
        if row is None:
            return Recorded(stored=False)
        if event.job is None:
            return Recorded(stored=True)
        msg_id = await producer.enqueue(event.job.queue, event.job.payload, conn=conn)
        await conn.execute(_sql.SET_EVENT_JOB, {"queue": event.job.queue, "msg_id": msg_id, "id": row[0]})
        return Recorded(stored=True, msg_id=msg_id)


async def ready(pool: AsyncConnectionPool[Any], *, connect_timeout: float) -> None:
    async with pool.connection(timeout=connect_timeout) as conn:
        await conn.execute(_sql.READY)
