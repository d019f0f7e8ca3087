"""Helpers of wl-workers' tests: set up a router with customers, run a worker, wait without sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from pg_worker import AsyncProducer, Worker, WorkerConfig, testing
from wl_workers._store import Service, add_device, add_service, get_service
from wl_workers.actions import action_message
from wl_workers.app import build_app
from wl_workers.settings import DEVICE_ACTIONS, WlSettings
from wl_workers.simulator import RouterSimulator

PASSWORD_REF = "env:WL_TEST_ROUTER_PASSWORD"
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def fast_settings(**overrides: Any) -> WlSettings:
    values: dict[str, Any] = {"action_base_delay": 0.1, "action_max_delay": 0.5, "busy_retry_delay": 0.1, "http_read_timeout": 2.0, "http_connect_timeout": 1.0, "lock_wait": 5.0, "payment_base_delay": 0.1}
    values.update(overrides)
    return WlSettings(**values)


async def add_router(url: str, sim: RouterSimulator, name: str = "r1", *, password_ref: str = PASSWORD_REF, max_concurrent: int = 2) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await add_device(conn, name=name, host="127.0.0.1", port=sim.port, scheme="http", username=sim.username, password_ref=password_ref, max_concurrent=max_concurrent)


async def add_customer(url: str, service_id: str, method: str, target: str, device: str = "r1") -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await add_service(conn, service_id, device, method, target)


async def enqueue(url: str, action: str, service_id: str, event_at: datetime, reason: str = "test") -> int:
    async with AsyncProducer(url) as producer:
        return await producer.enqueue(DEVICE_ACTIONS, action_message(action, service_id, event_at, reason))


async def service_row(url: str, service_id: str) -> Service:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await get_service(conn, service_id)


async def queue_depth(url: str, queue: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM pgmq.q_{queue}")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def dlq(url: str, queue: str = DEVICE_ACTIONS) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT message FROM pgmq.q_{queue}_dlq ORDER BY msg_id")
        return [row[0] for row in await cur.fetchall()]


async def drain(url: str, settings: WlSettings | None = None) -> None:
    """Process what is due now and return."""
    worker = Worker(build_app(url, settings or fast_settings()), url, WorkerConfig(listen=False, worker_id=f"drain-{time.monotonic_ns()}"))
    await worker.run(stop_when_idle=True)


@contextlib.asynccontextmanager
async def running_worker(url: str, settings: WlSettings | None = None) -> AsyncIterator[Worker]:
    worker = Worker(build_app(url, settings or fast_settings()), url, WorkerConfig(worker_id=f"bg-{time.monotonic_ns()}", shutdown_grace=5))
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.health.started or task.done(), what="worker start")
        if task.done():
            task.result()
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=60)


async def wait_until(predicate: Callable[[], Any], limit: float = 20.0, interval: float = 0.02, what: str = "condition") -> None:
    await testing.wait_until(predicate, limit, interval, what=what)


def changes(sim: RouterSimulator) -> list[tuple[str, str]]:
    """The requests that changed something (PUT/PATCH/DELETE answered 2xx)."""
    return [(r.method, r.path) for r in sim.requests if r.method in ("PUT", "PATCH", "DELETE") and 200 <= r.status < 300]


async def queue_dlq_count(url: str, queue: str = DEVICE_ACTIONS) -> int:
    return await queue_depth(url, f"{queue}_dlq")
