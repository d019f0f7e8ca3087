"""Suspects (messages whose previous delivery ended with no outcome: a worker died under them) run one at a
time in their own lane; the worker's other jobs must not wait for them (issue 18, item 3).

One worker, ordinary jobs at a steady 40/s on two queues; in the measured run a slow suspect (2 s) turns up
every 2 s, so one is nearly always running. The figure is the ordinary jobs' latency (enqueue to handler start)
next to the same workload without suspects. Before the suspect lane, a suspect held every queue of the worker
until it was alone: p99 went from milliseconds to seconds.

``scenario(url, duration, suspects=...)`` is the building block a longer fault soak can call.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from pg_worker import App, Job, PollSchedule, Worker, WorkerConfig

from .bench_latency import _wait_for
from .common import Row, Server, percentile

RATE = 40.0
SUSPECT_EVERY = 2.0
SUSPECT_SECONDS = 2.0
QUEUES = ["jobs", "other"]


async def scenario(url: str, duration: float, *, suspects: bool) -> list[float]:
    """Latencies (s) of the ordinary jobs sent during ``duration`` seconds, with or without suspects."""
    app = App()
    latencies: list[float] = []
    suspect_runs: list[int] = []
    planted = 0

    async def handle(job: Job[dict[str, Any]]) -> None:
        if job.payload.get("suspect"):
            suspect_runs.append(job.attempt)
            await asyncio.sleep(SUSPECT_SECONDS)
            return
        latencies.append(max(0.0, time.time() - job.payload["sent"]))

    for queue in QUEUES:
        app.queue(queue, visibility_timeout=30)
        app.add_handler(queue, handle)
    worker = Worker(app, url, WorkerConfig(poll=PollSchedule(interval=600), worker_id="bench-suspects"))
    task = asyncio.create_task(worker.run())
    sent = 0
    try:
        await _wait_for(lambda: worker.health.started or task.done(), 60)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            start = time.monotonic()
            next_suspect = start
            while time.monotonic() - start < duration:
                queue = QUEUES[sent % len(QUEUES)]
                await conn.execute("SELECT pgmq.send(%s, jsonb_build_object('sent', %s::float8))", (queue, time.time()))
                sent += 1
                if suspects and time.monotonic() >= next_suspect:
                    # Read once with no outcome recorded, as if its worker had died: its next delivery is a suspect.
                    async with conn.transaction():
                        cur = await conn.execute("SELECT pgmq.send('jobs', '{\"suspect\": true}')")
                        row = await cur.fetchone()
                        assert row is not None
                        await conn.execute("UPDATE pgmq.q_jobs SET read_ct = 1 WHERE msg_id = %s", (row[0],))
                    planted += 1
                    next_suspect += SUSPECT_EVERY
                await asyncio.sleep(1.0 / RATE)
        await _wait_for(lambda: len(latencies) >= sent and len(suspect_runs) >= planted, 120)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)
    if suspects and not suspect_runs:
        raise RuntimeError("no suspect ran: the scenario measured nothing")
    return latencies


def run(server: Server, *, quick: bool, repeat: int) -> list[Row]:
    duration = 6.0 if quick else 20.0
    rows = {
        q: Row("suspects", f"ordinary job latency p{q}, a 2 s suspect every 2 s", "ms", baseline_name="no suspects", target="< 1.5x", higher_is_better=False)
        for q in (50, 99)
    }
    for _ in range(1 if quick else repeat):
        for suspects, target in ((True, "ours"), (False, "baseline")):
            with server.database(QUEUES) as url:
                series = asyncio.run(scenario(url, duration, suspects=suspects))
            for q, row in rows.items():
                getattr(row, target).append(percentile(series, q) * 1000)
    return list(rows.values())
