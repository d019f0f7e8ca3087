"""The worker's connection pool and the few ways its parts use it: every statement bounded, every failure
logged with context and counted, and the health record kept current."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
import psycopg_pool
from psycopg.rows import TupleRow
from psycopg.types.json import set_json_loads

from ._config import WorkerConfig
from ._events import WorkerObserver

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]

DB_ERRORS = (psycopg.Error, psycopg_pool.PoolTimeout, OSError, TimeoutError)


@dataclass
class WorkerHealth:
    """What health endpoints report; updated by the worker's parts as they run."""

    started: bool = False
    stopping: bool = False
    listening: bool | None = None  # None in poll-only mode
    last_tick: float = field(default_factory=time.monotonic)
    last_notification: float | None = None
    last_db_ok: float | None = None
    last_db_error: str | None = None
    last_db_error_at: float | None = None
    listen_down_since: float | None = field(default_factory=time.monotonic)
    crashed: str | None = None
    # Since when a part has had work it could not finish (None: idle or keeping up). Liveness fails when one
    # of these is older than the configured bound: a hung statement must not leave a worker "alive".
    lease_keeper_stalled_since: float | None = None
    acknowledger_stalled_since: float | None = None
    stuck_sync_jobs: int = 0  # sync handlers still running past their job_timeout


def connection_kwargs(config: WorkerConfig) -> dict[str, Any]:
    """libpq settings that keep a dead peer (a cut VPN, a blackholed route) from hanging a connection forever.

    Keepalives find a silent server without any SQL; ``tcp_user_timeout`` bounds how long unacknowledged data
    may wait (a write to a blackhole); ``statement_timeout`` bounds a statement the server is slow to finish.
    libpq ignores the TCP settings on Unix sockets, where a dead server is seen at once anyway.
    """
    return {
        "connect_timeout": max(2, int(config.pool_timeout)),
        "keepalives": 1,
        "keepalives_idle": max(1, int(config.tcp_keepalive_idle)),
        "keepalives_interval": max(1, int(config.tcp_keepalive_interval)),
        "keepalives_count": 3,
        "tcp_user_timeout": int(config.tcp_user_timeout * 1000),
        "options": f"-c statement_timeout={int(config.statement_timeout * 1000)}",
    }


class Database:
    def __init__(self, conninfo: str, config: WorkerConfig, observers: WorkerObserver, health: WorkerHealth, *, max_size: int) -> None:
        self.config = config
        self.observers = observers
        self.health = health
        self.pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = psycopg_pool.AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=max_size,
            kwargs={"autocommit": True, **connection_kwargs(config)},
            open=False,
            name="pg-worker",
            timeout=config.pool_timeout,
            # psycopg_pool retries a failed connection with a backoff that doubles without bound (1, 2, 4, 8 s...):
            # after an outage the pool would wait seconds before trying again. Giving up after a short while
            # lets the next request start a fresh attempt at once, and our callers already back off (at most
            # db_retry_max), so work resumes within about that of the database being back.
            reconnect_timeout=max(1.0, 2 * config.db_retry_max),
            configure=self._configure_connection,
        )
        self._abandoned: set[asyncio.Task[list[Row]]] = set()

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def _configure_connection(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # Leases, acknowledgements, retries and dead-letter moves may all be lost in a database crash without
        # losing a job: the message just comes back (at-least-once). So the worker's own commits need not
        # wait for the WAL flush, which takes that wait off every batch and off the notify-to-handler path.
        # Producers keep their own (normally synchronous) commits: an enqueue is never at risk.
        if not self.config.synchronous_commit:
            await conn.execute("SET synchronous_commit = off")
        set_json_loads(orjson.loads, conn)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[TupleRow]]:
        async with self.pool.connection() as conn:
            yield conn

    async def fetchall(self, query: Any, params: Any = None, *, timeout: float | None = None) -> list[Row]:  # noqa: ASYNC109 - the bound is the point: see _bounded
        """Rows of one statement, within ``timeout`` seconds (default: the statement timeout plus the pool's)."""
        return await self.result(self.start(query, params), timeout)

    def start(self, query: Any, params: Any = None) -> asyncio.Task[list[Row]]:
        """Begin one statement now; collect its rows with :meth:`result`.

        The statement runs in a task of its own, so it goes out at that task's first step, ahead of whatever
        the caller schedules after it: the fetch loop sends its next read *before* it starts the jobs of the
        batch it just read, and the server works on the read while those jobs run."""
        return asyncio.ensure_future(self._fetchall(query, params))

    async def result(self, statement: asyncio.Task[list[Row]], timeout: float | None = None) -> list[Row]:  # noqa: ASYNC109 - see _bounded
        """The rows of a statement begun with :meth:`start`, within ``timeout`` seconds (as :meth:`fetchall`)."""
        rows = await self._bounded(statement, timeout)
        self.health.last_db_ok = time.monotonic()
        return rows

    async def execute(self, query: Any, params: Any = None) -> None:
        await self.result(asyncio.ensure_future(self._fetchall(query, params, fetch=False)))

    async def _fetchall(self, query: Any, params: Any, *, fetch: bool = True) -> list[Row]:
        async with self.connection() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall() if fetch else []

    async def _bounded(self, task: asyncio.Task[list[Row]], timeout: float | None) -> list[Row]:  # noqa: ASYNC109 - asyncio.timeout would wait for psycopg's cancel
        """The client-side bound backs up statement_timeout when the network itself stalls (the server never
        sees the statement, or its answer never arrives). On a timeout psycopg first tries to cancel the query
        on the server, for up to 10 s on a dead route: that goes on in the background, the caller moves on."""
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout or self.config.statement_timeout + self.config.pool_timeout + 1.0)
        except BaseException:
            if not task.done():
                task.cancel()
                self._abandoned.add(task)
                task.add_done_callback(self._forget)
            raise

    def _forget(self, task: asyncio.Task[list[Row]]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its error was reported as the timeout already

    def backoff(self, failures: int) -> float:
        ceiling = min(self.config.db_retry_max, 0.05 * 2.0 ** min(failures, 16))
        return float(ceiling * (0.5 + random.random() / 2))

    def failed(self, operation: str, exc: BaseException, **context: Any) -> None:
        self.health.last_db_error = f"{type(exc).__name__}: {exc}".strip()
        self.health.last_db_error_at = time.monotonic()
        self.observers.db_error(operation, exc)
        logger.warning(
            "db_error",
            extra={"event": "db_error", "operation": operation, "error": self.health.last_db_error, **context},
        )
