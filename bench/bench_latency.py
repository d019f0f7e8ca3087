"""Enqueue (from a separate producer process) to handler start, at a steady 50 jobs/s."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from pg_worker import App, Job, Worker, WorkerConfig

from .bench_drain import wait_listening
from .common import Row, Server, percentile

RATE = 50.0
WARMUP = 10
ROOT = Path(__file__).resolve().parent.parent

RAW_TRIGGER = """
CREATE OR REPLACE FUNCTION public.raw_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('raw_jobs', ''); RETURN NULL; END $$;
CREATE TRIGGER raw_notify AFTER INSERT ON pgmq.q_jobs FOR EACH STATEMENT EXECUTE FUNCTION public.raw_notify();
"""


async def _produce(url: str, count: int) -> dict[int, float]:
    """Run the producer process; returns when each message's commit returned, by msg_id."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.producer", url, "jobs", "--rate", str(RATE), "--count", str(count), cwd=str(ROOT), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("producer failed")
    committed = {}
    for line in out.decode().splitlines():
        msg_id, at = line.split()
        committed[int(msg_id)] = float(at)
    return committed


Latencies = tuple[list[float], list[float]]  # from the send call, from the commit


async def _wait_for(predicate: Any, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not finish in time")
        await asyncio.sleep(0.01)


def _split(started: dict[int, tuple[float, float]], committed: dict[int, float]) -> Latencies:
    ordered = sorted(started.items())[WARMUP:]
    return [start - sent for _, (sent, start) in ordered], [start - committed[msg_id] for msg_id, (_, start) in ordered]


async def ours(url: str, count: int) -> Latencies:
    started: dict[int, tuple[float, float]] = {}
    app = App()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        started[job.msg_id] = (job.payload["sent_at"], time.time())

    worker = Worker(app, url, WorkerConfig(worker_id="bench-latency"))
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.to_thread(wait_listening, url, 1)
        committed = await _produce(url, count)
        await _wait_for(lambda: len(started) >= count, 30)
    finally:
        worker.request_stop()
        await task
    return _split(started, committed)


async def raw_listen_read(url: str, count: int) -> Latencies:
    """The floor: LISTEN on a trigger that always notifies, then read + delete, nothing else."""
    started: dict[int, tuple[float, float]] = {}
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
                    started.update((msg_id, (message["sent_at"], now)) for msg_id, message in rows)
                    if rows:
                        await work.execute("SELECT pgmq.delete('jobs', %s::bigint[])", ([r[0] for r in rows],))
                    if len(rows) < 100:
                        break
                if len(started) >= count:
                    return

        consumer = asyncio.create_task(consume())
        committed = await _produce(url, count)
        await asyncio.wait_for(consumer, 30)
    return _split(started, committed)


def run(server: Server, *, quick: bool, repeat: int) -> list[Row]:
    count = 60 if quick else 500
    rows = {
        (since, q): Row(
            "latency",
            f"{name} to handler start p{q} @50/s",
            "ms",
            baseline_name="raw LISTEN + read",
            target=("<= 2 ms" if q == 50 else "<= 10 ms") if since == 1 else "",
            higher_is_better=False,
        )
        for since, name in ((0, "send() call"), (1, "enqueue committed"))
        for q in (50, 99)
    }
    for _ in range(1 if quick else repeat):
        for measure, target in ((ours, "ours"), (raw_listen_read, "baseline")):
            with server.database(["jobs"]) as url:
                series = asyncio.run(measure(url, count))
            for (since, q), row in rows.items():
                getattr(row, target).append(percentile(series[since], q) * 1000)
    return list(rows.values())
