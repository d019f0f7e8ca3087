"""Idle cost: database transactions per minute of a worker with default settings and nothing to do."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .bench_drain import wait_listening
from .common import Row, Server, dbname_of

STATS_FLUSH = 11.5  # idle backends flush their counters within 10 s
ROOT = Path(__file__).resolve().parent.parent


def _window(server: Server, dbname: str, seconds: float) -> float:
    before = server.commits(dbname)
    time.sleep(seconds + STATS_FLUSH)
    # Counted over the window plus the flush lag, divided by the window only: an upper bound.
    return (server.commits(dbname) - before) * 60.0 / seconds


def run(server: Server, *, quick: bool, repeat: int) -> list[Row]:
    seconds = 15.0 if quick else 100.0
    row = Row("idle", "worker transactions per minute, noise floor subtracted", "xact/min", baseline_name="same window, no worker", target="<= 2", higher_is_better=False)
    for _ in range(1 if quick else max(1, repeat // 3)):
        with server.database(["jobs"]) as url:
            dbname = dbname_of(url)
            noise = _window(server, dbname, seconds)
            row.baseline.append(noise)
            env = {**os.environ, "DATABASE_URL": url, "PG_WORKER_LOG_LEVEL": os.environ.get("BENCH_IDLE_LOG_LEVEL", "WARNING"), "PYTHONPATH": str(ROOT)}
            # Default settings, metrics port included (scrapes would add one statement per stats interval).
            worker = subprocess.Popen([sys.executable, "-m", "pg_worker", "run", "bench.apps:noop_app", "--metrics-port", "0"], env=env)
            try:
                wait_listening(url, 1)  # started and asleep, however slow the machine is right now
                time.sleep(STATS_FLUSH)  # start-up transactions land before the window
                row.ours.append(max(0.0, _window(server, dbname, seconds) - noise))
            finally:
                worker.terminate()
                worker.wait(30)
    return [row]
