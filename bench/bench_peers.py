"""The peers, measured in the same run when installed (``pip install -r requirements/bench.txt``): PgQueuer
draining the same number of no-op jobs, next to the raw pgmq loop and pg-worker."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .bench_drain import raw_loop, worker_drain
from .common import Row, Server


def pgqueuer_available() -> bool:
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return False
    return True


async def pgqueuer_drain(url: str, count: int, batch_size: int) -> float:
    """PgQueuer 1.x in drain mode, asyncpg driver, a no-op entrypoint; jobs per second."""
    import asyncpg
    from pgqueuer import QueueManager
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    params = conninfo_to_dict(url)
    conn = await asyncpg.connect(host=params.get("host"), port=params.get("port"), user=params.get("user"), database=params.get("dbname"))
    try:
        queries = Queries(AsyncpgDriver(conn))  # its fastest driver
        await queries.install()
        for start in range(0, count, 5000):
            n = min(5000, count - start)
            await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
        manager = QueueManager(queries)

        @manager.entrypoint("noop")  # type: ignore[untyped-decorator]
        async def noop(job: object) -> None:
            return None

        started = time.perf_counter()
        runner = asyncio.create_task(manager.run(mode=QueueExecutionMode.drain, batch_size=batch_size, dequeue_timeout=timedelta(seconds=1)))
        # Timed until its queue table is empty (finished jobs leave it), not until run() returns: drain mode
        # waits out one more dequeue timeout at the end.
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as probe:
            while True:
                cur = await probe.execute("SELECT NOT EXISTS (SELECT 1 FROM pgqueuer)")
                row = await cur.fetchone()
                if row and row[0]:
                    break
                await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        await runner
        return count / elapsed
    finally:
        await conn.close()


def run(server: Server, *, quick: bool, repeat: int) -> list[Row]:
    count = 2000 if quick else 20000
    if not pgqueuer_available():
        return [Row("peers", "PgQueuer not installed: pip install -r requirements/bench.txt", "jobs/s")]
    raw = Row("peers", f"drain {count:,}: pg-worker vs raw pgmq loop", "jobs/s", baseline_name="raw loop: read 100 + delete 100")
    peers = {b: Row("peers", f"drain {count:,}: pg-worker vs PgQueuer 1.x (batch {b})", "jobs/s", baseline_name=f"PgQueuer, batch {b}") for b in (10, 100)}
    for _ in range(1 if quick else repeat):
        with server.database(["jobs"]) as url:
            raw.baseline.append(raw_loop(url, count))
        with server.database(["jobs"]) as url:
            ours = worker_drain(url, count)
        raw.ours.append(ours)
        for batch, row in peers.items():
            row.ours.append(ours)
            with server.database([], install=False) as url:
                row.baseline.append(asyncio.run(pgqueuer_drain(url, count, batch)))
    return [raw, *peers.values()]
