"""Drain a queue of no-op jobs: pg-worker (a `pg-worker run` process, default settings) against the raw loop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from .common import Row, Server

ROOT = Path(__file__).resolve().parent.parent


def fill(url: str, count: int, queue: str = "jobs", *, visible_at: float | None = None) -> None:
    """Send ``count`` empty jobs; with ``visible_at`` (epoch seconds) they all become visible at that moment."""
    with psycopg.connect(url, autocommit=True) as conn:
        for start in range(0, count, 5000):
            n = min(5000, count - start)
            if visible_at is None:
                conn.execute("SELECT pgmq.send_batch(%s, array_fill('{}'::jsonb, ARRAY[%s]))", (queue, n))
            else:
                conn.execute(
                    "SELECT pgmq.send_batch(%s, array_fill('{}'::jsonb, ARRAY[%s]), to_timestamp(%s))", (queue, n, visible_at)
                )


def empty(conn: psycopg.Connection[tuple[bool]], queue: str = "jobs") -> bool:
    row = conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM pgmq.q_{queue})").fetchone()
    assert row is not None
    return bool(row[0])


def raw_loop(url: str, count: int) -> float:
    """The baseline: read 100 + delete 100 on one connection, in Python with psycopg. Jobs per second."""
    fill(url, count)
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        done = 0
        while True:
            ids = [row[0] for row in conn.execute("SELECT msg_id FROM pgmq.read('jobs', 30, 100)").fetchall()]
            if not ids:
                break
            conn.execute("SELECT pgmq.delete('jobs', %s::bigint[])", (ids,))
            done += len(ids)
        elapsed = time.perf_counter() - started
    assert done == count, (done, count)
    return count / elapsed


def start_workers(url: str, processes: int, app: str = "bench.apps:noop_app", **env: str) -> list[subprocess.Popen[bytes]]:
    # PYTHONPATH is the repository root (for bench.apps): the workers run this checkout's pg_worker whatever the
    # caller's PYTHONPATH says. To compare versions, use `python -m bench.ab` (a venv per version).
    environment = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT), "PG_WORKER_METRICS_PORT": "0", **env}
    return [
        subprocess.Popen([sys.executable, "-m", "pg_worker", "run", app], env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(processes)
    ]


def wait_listening(url: str, processes: int, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT count(DISTINCT worker_id) FROM pgworker.waiters").fetchone()
            if row and row[0] >= processes:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not start")
            time.sleep(0.05)


def stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.wait(60)


def worker_drain(url: str, count: int, processes: int = 1, app: str = "bench.apps:noop_app", **env: str) -> float:
    """Workers idle and listening; ``count`` jobs all become visible at one moment (sent earlier with a delay,
    so sending is not timed); jobs per second from that moment until the queue is empty."""
    workers = start_workers(url, processes, app, **env)
    try:
        wait_listening(url, processes)
        visible_at = time.time() + 2.0 + count / 20000
        fill(url, count, visible_at=visible_at)
        with psycopg.connect(url, autocommit=True) as conn:
            time.sleep(max(0.0, visible_at - time.time()))
            while not empty(conn):
                time.sleep(0.02)
            elapsed = time.time() - visible_at
    finally:
        stop(workers)
    return count / elapsed


def run(server: Server, *, quick: bool, repeat: int) -> list[Row]:
    count = 2000 if quick else 20000
    row = Row("drain", f"drain {count:,} queued no-op jobs", "jobs/s", baseline_name="raw loop: read 100 + delete 100", target=">= 0.60x")
    for _ in range(1 if quick else repeat):
        with server.database(["jobs"]) as url:
            row.baseline.append(raw_loop(url, count))
        with server.database(["jobs"]) as url:
            row.ours.append(worker_drain(url, count))
    return [row]
