"""Scale-out (1, 2, 4 worker processes on one queue) and memory over a long soak."""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import psycopg

from .bench_drain import empty, fill, start_workers, stop, wait_listening, worker_drain
from .common import Row, Server


def drain_with(url: str, count: int, processes: int) -> tuple[float, int]:
    """Jobs per second for ``processes`` workers draining ``count`` jobs, and how many ran more than once."""
    with tempfile.TemporaryDirectory(prefix="pgw-scale-") as out:
        rate = worker_drain(url, count, processes, "bench.apps:recording_app", BENCH_OUT=out)
        runs = Counter(line.split()[0] for path in Path(out).glob("*.ids") for line in path.read_text().splitlines() if line)
    assert len(runs) == count, f"{len(runs)} of {count} jobs ran"
    return rate, sum(1 for n in runs.values() if n > 1)


def soak(url: str, count: int) -> tuple[float, float]:
    """RSS (MiB) of one worker after the first fifth of ``count`` jobs and at the end."""
    workers = start_workers(url, 1)
    try:
        wait_listening(url, 1)
        process = psutil.Process(workers[0].pid)
        chunk = count // 10
        samples = []
        with psycopg.connect(url, autocommit=True) as conn:
            for _ in range(10):
                fill(url, chunk)
                while not empty(conn):
                    time.sleep(0.05)
                samples.append(process.memory_info().rss / 2**20)
    finally:
        stop(workers)
    return samples[1], samples[-1]


def run(server: Server, *, quick: bool, repeat: int) -> list[Row]:
    count = 2000 if quick else 20000
    rows = {n: Row("scale-out", f"{n} worker process{'es' if n > 1 else ''} draining {count:,} jobs", "jobs/s", baseline_name="1 worker process" if n > 1 else "", target="does not fall" if n > 1 else "") for n in (1, 2, 4)}
    duplicates = Row("scale-out", "jobs run twice while their lease held (1, 2, 4 processes)", "jobs", target="0", higher_is_better=False)
    for _ in range(1 if quick else repeat):
        for n in (1, 2, 4):
            with server.database(["jobs"]) as url:
                rate, twice = drain_with(url, count, n)
            rows[n].ours.append(rate)
            duplicates.ours.append(twice)
    for n in (2, 4):
        rows[n].baseline = list(rows[1].ours)
    soak_count = 10000 if quick else 100000
    memory = Row("memory", f"worker RSS after {soak_count:,} jobs", "MiB", baseline_name=f"RSS after {soak_count // 5:,} jobs", target="<= 1.10x", higher_is_better=False)
    with server.database(["jobs"]) as url:
        early, late = soak(url, soak_count)
    memory.ours.append(late)
    memory.baseline.append(early)
    return [rows[1], rows[2], rows[4], duplicates, memory]
