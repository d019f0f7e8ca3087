"""Test helpers: a recording observer, a worker running in the background, and waiting without sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pg_worker import App, Job, Outcome, WakeupSource, Worker, WorkerConfig, WorkerObserver, testing

__all__ = ["RecordingObserver", "dlq_messages", "expire", "marks", "queue_rows", "read_one", "running_worker", "wait_until"]


@dataclass
class Finished:
    queue: str
    msg_id: int
    attempt: int
    outcome: Outcome
    error: BaseException | None
    at: float


@dataclass
class RecordingObserver(WorkerObserver):
    started: list[tuple[str, int, float]] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)
    rejected: list[tuple[str, int, str]] = field(default_factory=list)
    wakeups: list[tuple[str, WakeupSource, float]] = field(default_factory=list)
    listen_states: list[bool] = field(default_factory=list)
    notifications: int = 0
    db_errors: list[str] = field(default_factory=list)
    leases_lost: list[tuple[str, int, str]] = field(default_factory=list)
    loop_ticks: int = 0

    def job_started(self, job: Job[object], latency: float) -> None:
        self.started.append((job.queue, job.msg_id, time.monotonic()))

    def job_finished(self, job: Job[object], outcome: Outcome, duration: float, error: BaseException | None) -> None:
        self.finished.append(Finished(job.queue, job.msg_id, job.attempt, outcome, error, time.monotonic()))

    def message_rejected(self, queue: str, msg_id: int, reason: str) -> None:
        self.rejected.append((queue, msg_id, reason))

    def wakeup(self, queue: str, source: WakeupSource) -> None:
        self.wakeups.append((queue, source, time.monotonic()))

    def listen_state(self, connected: bool) -> None:
        self.listen_states.append(connected)

    def notification(self, queue: str) -> None:
        self.notifications += 1

    def db_error(self, operation: str, error: BaseException) -> None:
        self.db_errors.append(operation)

    def lease_lost(self, queue: str, msg_id: int, operation: str) -> None:
        self.leases_lost.append((queue, msg_id, operation))

    def loop_tick(self) -> None:
        self.loop_ticks += 1

    def outcomes(self, outcome: Outcome) -> list[Finished]:
        return [f for f in self.finished if f.outcome is outcome]


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005, *, what: str = "condition", limit: float | None = None) -> None:  # noqa: ASYNC109 - a polling deadline
    """:func:`pg_worker.testing.wait_until`; ``limit`` is the name these tests used for ``timeout`` before it."""
    await testing.wait_until(predicate, timeout if limit is None else limit, interval, what=what)


async def marks(url: str, worker_id: str | None = None) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        if worker_id is None:
            cur = await conn.execute("SELECT count(*) FROM pgworker.waiters")
        else:
            cur = await conn.execute("SELECT count(*) FROM pgworker.waiters WHERE worker_id = %s", (worker_id,))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


@contextlib.asynccontextmanager
async def running_worker(app: App, url: str, observer: RecordingObserver | None = None, **settings: Any) -> AsyncIterator[Worker]:
    """Run a worker in the background; on entry it is idle (and, when listening, marked as waiting)."""
    settings.setdefault("worker_id", f"test-{id(app)}")
    config = WorkerConfig(**settings)
    worker = Worker(app, url, config, observers=[observer] if observer else [])
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.health.started or task.done(), what="worker start")
        if config.listen:
            await wait_until(lambda: _marked_all(url, config.worker_id, len(app.queues), task), what="worker idle and marked")
        if task.done():
            task.result()
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=60)


async def _marked_all(url: str, worker_id: str, count: int, task: asyncio.Task[None]) -> bool:
    return task.done() or await marks(url, worker_id) >= count


async def queue_rows(url: str, queue: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT msg_id, read_ct, vt, message FROM pgmq.q_{queue} ORDER BY msg_id")
        return await cur.fetchall()


async def dlq_messages(url: str, queue: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT message FROM pgmq.q_{queue}_dlq ORDER BY msg_id")
        return [row[0] for row in await cur.fetchall()]


async def read_one(url: str, queue: str, vt: int = 30) -> tuple[int, int]:
    """Lease one message as another worker would (pgmq.read): its msg_id and read_ct."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT msg_id, read_ct FROM pgmq.read(%s, %s, 1)", (queue, vt))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


async def expire(url: str, queue: str) -> None:
    """End every lease on ``queue`` now, as if its holder had stalled past its visibility timeout."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"UPDATE pgmq.q_{queue} SET vt = clock_timestamp()")
