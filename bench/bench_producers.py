"""What wakeups cost producers: our trigger against no trigger at all (and pgmq's own, for contrast)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg

from .common import Row, Server

ROOT = Path(__file__).resolve().parent.parent
PRODUCERS = 8

# Trigger set-ups of the queue 'jobs'. A waiting worker is simulated by its mark row, so the measurement is
# of the producers alone (a live worker would take CPU from them on a 2-core machine).
SETUPS = {
    "no trigger": ["DROP TRIGGER pg_worker_wakeup ON pgmq.q_jobs"],
    "ours, no worker waiting": [],
    "ours, a worker waiting": ["INSERT INTO pgworker.waiters (queue_name, worker_id, listener_pid) VALUES ('jobs', 'bench', pg_backend_pid())"],
    "pgmq enable_notify_insert(0)": ["DROP TRIGGER pg_worker_wakeup ON pgmq.q_jobs", "SELECT pgmq.enable_notify_insert('jobs', 0)"],
}


def _prepare(url: str, setup: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in SETUPS[setup]:
            conn.execute(statement)


def concurrent_single_sends(url: str, per_producer: int) -> float:
    """``PRODUCERS`` processes, one message per transaction each; messages per second, all together."""
    start_at = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.producer", url, "jobs", "--flat-out", "--count", str(per_producer), "--start-at", str(start_at)],
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(PRODUCERS)
    ]
    ends = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError("producer failed")
        ends.append(float(out.strip()))
    return PRODUCERS * per_producer / (max(ends) - start_at)


def batch_sends(url: str, batches: int, size: int = 1000) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pgmq.send_batch('jobs', array_fill('{}'::jsonb, ARRAY[10]))")  # warm up
        started = time.perf_counter()
        for _ in range(batches):
            conn.execute("SELECT pgmq.send_batch('jobs', array_fill('{}'::jsonb, ARRAY[%s]))", (size,))
        return batches * size / (time.perf_counter() - started)


def run(server: Server, *, quick: bool, repeat: int) -> list[Row]:
    per_producer = 100 if quick else 2000
    batches = 3 if quick else 40
    single: dict[str, list[float]] = {name: [] for name in SETUPS}
    batched: dict[str, list[float]] = {name: [] for name in SETUPS}
    for _ in range(1 if quick else repeat):
        for name in SETUPS:
            with server.database(["jobs"]) as url:
                _prepare(url, name)
                single[name].append(concurrent_single_sends(url, per_producer))
            with server.database(["jobs"]) as url:
                _prepare(url, name)
                batched[name].append(batch_sends(url, batches))
    rows = []
    for name in list(SETUPS)[1:]:
        target = ">= 0.90x" if name.startswith("ours, no") else ""
        rows.append(Row("producers", f"{PRODUCERS} producers, 1 msg/txn: {name}", "msg/s", single[name], single["no trigger"], "no trigger", target))
        rows.append(Row("producers", f"send_batch of 1,000: {name}", "msg/s", batched[name], batched["no trigger"], "no trigger", target))
    return rows
