"""Putting jobs on queues, alone or inside the caller's transaction.

Given ``conn``, a send runs on that connection, so it commits or rolls back with the caller's transaction:
record a payment and enqueue its job atomically. Without ``conn`` the producer uses its own connection in
autocommit mode (opened lazily, reopened if the server went away).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from . import _sql
from ._names import validate_queue_name

Delay = float | int | timedelta | None


def _delay_seconds(delay: Delay) -> float:
    if delay is None:
        return 0.0
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if seconds < 0:
        raise ValueError("delay must be >= 0")
    return seconds


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from exc


def build_message(payload: Mapping[str, Any], job_type: str | None) -> dict[str, Any]:
    """Validate a payload and return the message to store (with ``type`` set when given)."""
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a mapping (a JSON object), got {type(payload).__name__}")
    message = dict(payload)
    if job_type is not None:
        if not isinstance(job_type, str) or not job_type:
            raise TypeError("type must be a non-empty string")
        existing = message.get("type")
        if existing is not None and existing != job_type:
            raise ValueError(f"payload already has type {existing!r}, which differs from {job_type!r}")
        message["type"] = job_type
    _check_json(message, "payload")
    return message


def _headers(headers: Mapping[str, Any] | None) -> Jsonb | None:
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        raise TypeError("headers must be a mapping")
    _check_json(dict(headers), "headers")
    return Jsonb(dict(headers))


def _send_params(queue: str, payload: Mapping[str, Any], job_type: str | None, delay: Delay, headers: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "queue": validate_queue_name(queue),
        "message": Jsonb(build_message(payload, job_type)),
        "headers": _headers(headers),
        "delay": _delay_seconds(delay),
    }


def _batch_params(queue: str, payloads: Sequence[Mapping[str, Any]], job_type: str | None, delay: Delay, headers: Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(payloads, Mapping) or not payloads:
        raise ValueError("payloads must be a non-empty sequence of mappings")
    messages = [Jsonb(build_message(p, job_type)) for p in payloads]
    header = _headers(headers)
    return {
        "queue": validate_queue_name(queue),
        "messages": messages,
        "headers": None if header is None else [header] * len(messages),
        "delay": _delay_seconds(delay),
    }


class Producer:
    """Synchronous producer. Thread-safe; pass ``conn`` to join a transaction of yours."""

    def __init__(self, conninfo: str | None = None) -> None:
        self._conninfo = conninfo
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def _own_connection(self) -> psycopg.Connection[Any]:
        if self._conninfo is None:
            raise ValueError("this Producer has no connection string: pass conn=")
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self._conninfo, autocommit=True)
        return self._conn

    def _run(self, query: str, params: dict[str, Any], conn: psycopg.Connection[Any] | None) -> list[int]:
        if conn is not None:
            return [row[0] for row in conn.execute(query, params).fetchall()]
        with self._lock:
            return [row[0] for row in self._own_connection().execute(query, params).fetchall()]

    def enqueue(
        self,
        queue: str,
        payload: Mapping[str, Any],
        *,
        type: str | None = None,
        delay: Delay = None,
        headers: Mapping[str, Any] | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> int:
        """Send one job; returns its msg_id. ``delay`` (seconds or timedelta) hides it until then."""
        return self._run(_sql.SEND, _send_params(queue, payload, type, delay, headers), conn)[0]

    def enqueue_many(
        self,
        queue: str,
        payloads: Sequence[Mapping[str, Any]],
        *,
        type: str | None = None,
        delay: Delay = None,
        headers: Mapping[str, Any] | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> list[int]:
        """Send several jobs in one statement (one wakeup for the whole batch); returns their msg_ids."""
        return self._run(_sql.SEND_BATCH, _batch_params(queue, payloads, type, delay, headers), conn)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncProducer:
    """Asynchronous producer; pass ``conn`` to join a transaction of yours."""

    def __init__(self, conninfo: str | None = None) -> None:
        self._conninfo = conninfo
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def _own_connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conninfo is None:
            raise ValueError("this AsyncProducer has no connection string: pass conn=")
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        return self._conn

    async def _run(self, query: str, params: dict[str, Any], conn: psycopg.AsyncConnection[Any] | None) -> list[int]:
        if conn is not None:
            cur = await conn.execute(query, params)
            return [row[0] for row in await cur.fetchall()]
        async with self._lock:
            cur = await (await self._own_connection()).execute(query, params)
            return [row[0] for row in await cur.fetchall()]

    async def enqueue(
        self,
        queue: str,
        payload: Mapping[str, Any],
        *,
        type: str | None = None,
        delay: Delay = None,
        headers: Mapping[str, Any] | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> int:
        """Send one job; returns its msg_id. ``delay`` (seconds or timedelta) hides it until then."""
        return (await self._run(_sql.SEND, _send_params(queue, payload, type, delay, headers), conn))[0]

    async def enqueue_many(
        self,
        queue: str,
        payloads: Sequence[Mapping[str, Any]],
        *,
        type: str | None = None,
        delay: Delay = None,
        headers: Mapping[str, Any] | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[int]:
        """Send several jobs in one statement (one wakeup for the whole batch); returns their msg_ids."""
        return await self._run(_sql.SEND_BATCH, _batch_params(queue, payloads, type, delay, headers), conn)

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
