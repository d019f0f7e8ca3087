"""Enqueue (from a separate producer process) to handler start, at a steady 50 jobs/s."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from pg_worker import App, Job, Worker, WorkerConfig

from .common import Row, Server, percentile

RATE = 50.0
WARMUP = 10
ROOT = Path(__file__).resolve().parent.parent

RAW_TRIGGER = """
CREATE OR REPLACE FUNCTION public.raw_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('raw_jobs', ''); RETURN NULL; END $$;
CREATE TRIGGER raw_notify AFTER INSERT ON pgmq.q_jobs FOR EACH STATEMENT EXECUTE FUNCTION public.raw_notify();
"""


async def _produce(url: str, count: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.producer", url, "jobs", "--rate", str(RATE), "--count", str(count), cwd=str(ROOT)
    )
    if await proc.wait() != 0:
        raise RuntimeError("producer failed")


async def _wait_for(predicate: Any, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not finish in time")
        await asyncio.sleep(0.01)


async def ours(url: str, count: int) -> list[float]:
    latencies: list[float] = []
    app = App()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        latencies.append(time.time() - job.payload["sent_at"])

    worker = Worker(app, url, WorkerConfig(worker_id="bench-latency"))
    task = asyncio.create_task(worker.run())
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:

            async def marked() -> bool:
                cur = await conn.execute("SELECT count(*) FROM pgworker.waiters")
                row = await cur.fetchone()
                return bool(row and row[0])

            deadline = time.monotonic() + 10
            while not await marked():
                if time.monotonic() > deadline:
                    raise TimeoutError("worker did not start")
                await asyncio.sleep(0.01)
        await _produce(url, count)
        await _wait_for(lambda: len(latencies) >= count, 30)
    finally:
        worker.request_stop()
        await task
    return latencies[WARMUP:]


async def raw_listen_read(url: str, count: int) -> list[float]:
    """The floor: LISTEN on a trigger that always notifies, then read + delete, nothing else."""
    latencies: list[float] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as setup:
        await setup.execute("DROP TRIGGER IF EXISTS pg_worker_wakeup ON pgmq.q_jobs")
        await setup.execute(RAW_TRIGGER)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as listen, await psycopg.AsyncConnection.connect(url, autocommit=True) as work:
        await listen.execute("LISTEN raw_jobs")

        async def consume() -> None:
            async for _ in listen.notifies():
                while True:
                    cur = await work.execute("SELECT msg_id, message FROM pgmq.read('jobs', 30, 100)")
                    rows = await cur.fetchall()
                    now = time.time()
                    latencies.extend(now - message["sent_at"] for _, message in rows)
                    if rows:
                        await work.execute("SELECT pgmq.delete('jobs', %s::bigint[])", ([r[0] for r in rows],))
                    if len(rows) < 100:
                        break
                if len(latencies) >= count:
                    return

        consumer = asyncio.create_task(consume())
        await _produce(url, count)
        await asyncio.wait_for(consumer, 30)
    return latencies[WARMUP:]


def run(server: Server, *, quick: bool, repeat: int) -> list[Row]:
    count = 60 if quick else 500
    p50 = Row("latency", "enqueue to handler start p50 @50/s", "ms", baseline_name="raw LISTEN + read", target="<= 2 ms", higher_is_better=False)
    p99 = Row("latency", "enqueue to handler start p99 @50/s", "ms", baseline_name="raw LISTEN + read", target="<= 10 ms", higher_is_better=False)
    for _ in range(1 if quick else repeat):
        with server.database(["jobs"]) as url:
            values = asyncio.run(ours(url, count))
        p50.ours.append(percentile(values, 50) * 1000)
        p99.ours.append(percentile(values, 99) * 1000)
        with server.database(["jobs"]) as url:
            values = asyncio.run(raw_listen_read(url, count))
        p50.baseline.append(percentile(values, 50) * 1000)
        p99.baseline.append(percentile(values, 99) * 1000)
    return [p50, p99]
