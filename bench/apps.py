"""Apps the benchmark runs in worker processes (``pg-worker run bench.apps:<name>``)."""

from __future__ import annotations

from typing import Any

from pg_worker import App, Job


def noop_app() -> App:
    app = App()

    @app.handler("jobs")
    async def noop(job: Job[dict[str, Any]]) -> None:
        return None

    return app


def recording_app() -> App:
    """No-op jobs whose msg_ids (and attempts) are written to $BENCH_OUT/<pid>.ids when the worker exits."""
    import atexit
    import os

    seen: list[str] = []
    out = os.environ["BENCH_OUT"]

    def dump() -> None:
        with open(os.path.join(out, f"{os.getpid()}.ids"), "w") as f:
            f.write("\n".join(seen))

    atexit.register(dump)
    app = App()

    @app.handler("jobs")
    async def record(job: Job[dict[str, Any]]) -> None:
        seen.append(f"{job.msg_id} {job.attempt}")

    return app


def soak_app() -> App:
    """Jobs of 20-200 ms (one in ten 1-3 s) for the fault soak (bench/bench_soak.py). Each run appends to $BENCH_OUT/<pid>.runs a
    start line with what the database says of its lease at that moment (the row's read_ct is still this
    delivery's and its visibility timeout has not passed) and an end line (also when it is cancelled)."""
    import asyncio
    import os
    import random
    import time

    import psycopg

    out = open(os.path.join(os.environ["BENCH_OUT"], f"{os.getpid()}.runs"), "a", buffering=1)  # noqa: SIM115 - open for the process's life
    url = os.environ["DATABASE_URL"]
    connection: list[psycopg.AsyncConnection[Any]] = []
    app = App()
    app.queue("jobs", visibility_timeout=int(os.environ.get("SOAK_VT", "5")))

    async def lease_held(job: Job[dict[str, Any]]) -> str:
        """'yes', 'no', or 'unknown' when the database cannot be asked (it is down, the backend was killed)."""
        try:
            if not connection or connection[0].closed:
                connection[:] = [await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=2, application_name="soak-check")]
            async with asyncio.timeout(2):
                cur = await connection[0].execute(
                    "SELECT read_ct = %s AND vt > clock_timestamp() FROM pgmq.q_jobs WHERE msg_id = %s", (job.attempt, job.msg_id)
                )
                row = await cur.fetchone()
        except (psycopg.Error, TimeoutError, OSError):
            if connection:
                await connection[0].close()
                connection.clear()
            return "unknown"
        return "yes" if row and row[0] else "no"

    @app.handler("jobs")
    async def run(job: Job[dict[str, Any]]) -> None:
        started = time.time()
        held = await lease_held(job)
        out.write(f"S {job.msg_id} {job.attempt} {held} {started:.6f} {job.payload.get('sent', 0):.6f}\n")
        try:
            # Mostly short jobs, and one in ten of 1-3 s: kills and terminations then hit running jobs (whose
            # messages come back as suspects), as they would in production.
            await asyncio.sleep(random.uniform(1.0, 3.0) if random.random() < 0.1 else random.uniform(0.02, 0.2))
        finally:
            out.write(f"E {job.msg_id} {job.attempt} {time.time():.6f}\n")

    return app
