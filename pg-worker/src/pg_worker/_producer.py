"""Putting jobs on queues, alone or inside the caller's transaction.

Given ``conn``, a send runs on that connection, so it commits or rolls back with the caller's transaction:
record a payment and enqueue its job atomically. Without ``conn`` the producer uses its own connection in
autocommit mode (opened lazily, reopened if the server went away).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from . import _sql
from ._names import validate_queue_name

Delay = float | int | timedelta | None

# A delay past this is a mistake (a timestamp for a duration, ms for s); PostgreSQL would store a vt centuries
# ahead, or fail with "timestamp out of range". One year covers every real schedule.
DEFAULT_MAX_DELAY = 365 * 24 * 3600.0
# pgmq stores jsonb (up to 255 MB), but every read moves whole messages: large blobs belong elsewhere.
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024


class MessageTooLarge(ValueError):
    """A payload whose JSON encoding exceeds the producer's ``max_message_size`` (bytes)."""


def _limits(max_delay: float | timedelta, max_message_size: int) -> tuple[float, int]:
    seconds = max_delay.total_seconds() if isinstance(max_delay, timedelta) else float(max_delay)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"max_delay must be a finite number of seconds >= 0, got {max_delay!r}")
    if isinstance(max_message_size, bool) or not isinstance(max_message_size, int) or max_message_size <= 0:
        raise ValueError(f"max_message_size must be a positive number of bytes, got {max_message_size!r}")
    return seconds, max_message_size


def _delay_seconds(delay: Delay, max_delay: float = DEFAULT_MAX_DELAY) -> float:
    if delay is None:
        return 0.0
    try:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"delay must be a number of seconds or a timedelta, got {delay!r}") from exc
    if not math.isfinite(seconds):
        raise ValueError(f"delay must be a finite number of seconds, got {delay!r}")
    if seconds < 0:
        raise ValueError(f"delay must be >= 0, got {delay!r}")
    if seconds > max_delay:
        raise ValueError(f"delay of {seconds:g} s exceeds the maximum of {max_delay:g} s (max_delay)")
    return seconds


def _encoded_size(value: Any, what: str) -> int:
    try:
        return len(json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from exc


def _check_json(value: Any, what: str) -> None:
    _encoded_size(value, what)


def _check_size(message: Mapping[str, Any], max_message_size: int) -> None:
    size = _encoded_size(message, "payload")
    if size > max_message_size:
        raise MessageTooLarge(f"message is too large: {size} bytes of JSON, the maximum is {max_message_size} (max_message_size)")


def build_message(payload: Mapping[str, Any], job_type: str | None, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> dict[str, Any]:
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
    _check_size(message, max_message_size)
    return message


def _headers(headers: Mapping[str, Any] | None) -> Jsonb | None:
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        raise TypeError("headers must be a mapping")
    _check_json(dict(headers), "headers")
    return Jsonb(dict(headers))


class _Limits:
    """What every producer checks before anything reaches the database."""

    def __init__(self, max_delay: float | timedelta, max_message_size: int) -> None:
        self.max_delay, self.max_message_size = _limits(max_delay, max_message_size)

    def send_params(self, queue: str, payload: Mapping[str, Any], job_type: str | None, delay: Delay, headers: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            "queue": validate_queue_name(queue),
            "message": Jsonb(build_message(payload, job_type, self.max_message_size)),
            "headers": _headers(headers),
            "delay": _delay_seconds(delay, self.max_delay),
        }

    def batch_params(self, queue: str, payloads: Sequence[Mapping[str, Any]], job_type: str | None, delay: Delay, headers: Mapping[str, Any] | None) -> dict[str, Any]:
        if isinstance(payloads, Mapping) or not payloads:
            raise ValueError("payloads must be a non-empty sequence of mappings")
        messages = [Jsonb(build_message(p, job_type, self.max_message_size)) for p in payloads]
        header = _headers(headers)
        return {
            "queue": validate_queue_name(queue),
            "messages": messages,
            "headers": None if header is None else [header] * len(messages),
            "delay": _delay_seconds(delay, self.max_delay),
        }


class Producer(_Limits):
    """Synchronous producer. Thread-safe; pass ``conn`` to join a transaction of yours.

    ``max_delay`` (seconds or timedelta) and ``max_message_size`` (bytes of JSON) bound what it accepts:
    beyond them a send raises :class:`ValueError` (:class:`MessageTooLarge` for size) and nothing is sent.
    """

    def __init__(
        self, conninfo: str | None = None, *, max_delay: float | timedelta = DEFAULT_MAX_DELAY, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> None:
        super().__init__(max_delay, max_message_size)
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
        return self._run(_sql.SEND, self.send_params(queue, payload, type, delay, headers), conn)[0]

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
        return self._run(_sql.SEND_BATCH, self.batch_params(queue, payloads, type, delay, headers), conn)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncProducer(_Limits):
    """Asynchronous producer; pass ``conn`` to join a transaction of yours. Limits as for :class:`Producer`."""

    def __init__(
        self, conninfo: str | None = None, *, max_delay: float | timedelta = DEFAULT_MAX_DELAY, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> None:
        super().__init__(max_delay, max_message_size)
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
        return (await self._run(_sql.SEND, self.send_params(queue, payload, type, delay, headers), conn))[0]

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
        return await self._run(_sql.SEND_BATCH, self.batch_params(queue, payloads, type, delay, headers), conn)

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
