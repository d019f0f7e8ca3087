"""A job starts only while its lease holds; lost and unwritten outcomes are picked up at once (issue 18)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pg_worker
from conftest import PgServer
from helpers import RecordingObserver, expire, read_one, running_worker, wait_until
from pg_worker import App, Job, Outcome, PollSchedule, Producer, RetryPolicy
from test_resilience import WorkerProcess

TEN_MINUTES = PollSchedule(interval=600)

# Renewals (an UPDATE that keeps read_ct) fail for the connections whose application_name is listed: a database
# that the worker cannot write to for a while, while other workers still can.
FAIL_RENEWALS = """
CREATE TABLE fail_renewals (app text PRIMARY KEY);
CREATE FUNCTION fail_renewal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.read_ct = OLD.read_ct AND EXISTS (SELECT 1 FROM fail_renewals WHERE app = current_setting('application_name')) THEN
        RAISE EXCEPTION 'renewals fail (test)';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fail_renewal BEFORE UPDATE ON pgmq.q_slow FOR EACH ROW EXECUTE FUNCTION fail_renewal();
"""


def _started(work_dir: Path, msg_id: int) -> list[str]:
    return sorted(p.name for p in work_dir.glob(f"started-{msg_id}-*"))


def _booted(work_dir: Path) -> bool:
    return '"event": "worker_started"' in (work_dir / "worker.log").read_text()


async def test_a_job_waiting_for_a_thread_is_not_started_after_its_lease_ended(
    db_url: str, tmp_path: Path, producer: Producer
) -> None:
    await pg_worker.install(db_url, ["slow"])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(FAIL_RENEWALS)
    blocker = producer.enqueue("slow", {"seconds": 6})
    victim = producer.enqueue("slow", {"seconds": 0})
    observer = RecordingObserver()
    url_a = db_url + ("&" if "?" in db_url else "?") + "application_name=worker-a"
    release = threading.Event()
    app = App()
    app.queue("slow", visibility_timeout=2)

    @app.handler("slow")
    def handle(job: Job[dict[str, Any]]) -> None:
        (tmp_path / f"started-{job.msg_id}-{job.attempt}-{os.getpid()}").write_text("")
        if job.payload["seconds"]:
            release.wait(60)  # the long job: until the test lets it end

    app.add_handler("slow", _async_noop, type="async")  # an app not only of sync handlers reads past its threads
    b: WorkerProcess | None = None
    # Worker A: one thread, so the victim waits in the pool's queue behind the long job. (Poll-only: a busy
    # worker never marks itself as waiting, which running_worker would wait for.)
    try:
        async with running_worker(app, url_a, observer, poll=TEN_MINUTES, listen=False, concurrency=2, sync_threads=1, worker_id="a"):
            await wait_until(lambda: _started(tmp_path, blocker), what="the long job started in A")
            b = WorkerProcess(db_url, tmp_path, PG_WORKER_WORKER_ID="b", PGW_TEST_VT="2")
            await wait_until(lambda: _booted(tmp_path), limit=60, interval=0.05, what="worker B started")
            async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
                await conn.execute("INSERT INTO fail_renewals VALUES ('worker-a')")
                failing_since = time.monotonic()
                # B reads both messages once A's leases have run out, and runs the victim at once.
                await wait_until(lambda: len(_started(tmp_path, victim)) >= 1, limit=30, what="the victim runs in B")
                await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - failing_since)))
                await conn.execute("DELETE FROM fail_renewals")
            # A's thread is free once the long job returns: the victim must be dropped, not started.
            release.set()
            await wait_until(
                lambda: ("slow", victim, "start") in observer.leases_lost or len(_started(tmp_path, victim)) > 1,
                limit=15,
                what="A reaches the victim",
            )
            await asyncio.sleep(0.3)
    finally:
        release.set()
        if b is not None:
            b.kill()
    assert b is not None
    runs = _started(tmp_path, victim)
    assert len(runs) == 1 and runs[0].endswith(f"-{b.proc.pid}"), f"run once, by B only: {runs}"
    assert ("slow", victim, "start") in observer.leases_lost, observer.leases_lost
    assert str(os.getpid()) not in runs[0]


async def _async_noop(job: Job[dict[str, Any]]) -> None:
    pass


async def test_a_worker_of_sync_handlers_reads_no_more_jobs_than_it_has_threads(db_url: str, producer: Producer) -> None:
    app = App()
    release = threading.Event()

    def handle(job: Job[dict[str, Any]]) -> None:
        release.wait(10)

    app.add_handler("jobs", handle)
    await pg_worker.install(db_url, ["jobs"])
    for _ in range(4):
        producer.enqueue("jobs", {})
    observer = RecordingObserver()
    try:
        async with running_worker(app, db_url, observer, poll=TEN_MINUTES, listen=False, concurrency=10, sync_threads=2):
            await wait_until(lambda: len(observer.started) >= 2, what="two jobs running")
            await asyncio.sleep(0.3)
            async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
                leased = await (await conn.execute("SELECT count(*) FROM pgmq.q_jobs WHERE read_ct > 0")).fetchone()
            release.set()
            await wait_until(lambda: len(observer.outcomes(Outcome.SUCCEEDED)) == 4, what="all done")
    finally:
        release.set()
    assert leased == (2,), "only what two threads can start is read"


async def test_a_suspect_runs_while_other_jobs_on_every_queue_go_on(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs", visibility_timeout=10)
    app.queue("other", visibility_timeout=10)
    started: dict[tuple[str, int], float] = {}
    release = asyncio.Event()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        started[("jobs", job.msg_id)] = time.monotonic()
        if job.payload.get("suspect"):
            await release.wait()

    @app.handler("other")
    async def handle_other(job: Job[dict[str, Any]]) -> None:
        started[("other", job.msg_id)] = time.monotonic()

    await pg_worker.install(db_url, ["jobs", "other"])
    suspect = producer.enqueue("jobs", {"suspect": True})
    await read_one(db_url, "jobs")  # a delivery that ends with no outcome, as if its worker had died...
    await expire(db_url, "jobs")  # ...so the next one is a suspect
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES, worker_id="a"):
        await wait_until(lambda: ("jobs", suspect) in started, what="the suspect runs")
        sent = time.monotonic()
        others = [("jobs", producer.enqueue("jobs", {})) for _ in range(3)] + [("other", producer.enqueue("other", {})) for _ in range(3)]
        await wait_until(lambda: all(key in started for key in others), limit=5, what="other jobs while the suspect runs")
        assert not release.is_set()
        latency = max(started[key] for key in others) - sent
        release.set()
        await wait_until(lambda: len(observer.outcomes(Outcome.SUCCEEDED)) == 7, what="all done")
    assert latency < 1.0, f"ordinary jobs waited {latency:.2f}s for the suspect"
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        assert await (await conn.execute("SELECT count(*) FROM pgmq.q_jobs")).fetchone() == (0,)


async def test_outcomes_written_during_a_postgres_restart_are_kept_and_every_job_runs_again_within_its_backoff(
    pg_server: PgServer, db_url: str, producer: Producer
) -> None:
    delay = 1.0
    app = App()
    app.queue("jobs", visibility_timeout=15, retry=RetryPolicy(max_attempts=5, base_delay=delay, max_delay=delay))
    starts: dict[tuple[int, int], float] = {}
    database_down = asyncio.Event()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        starts[(job.msg_id, job.attempt)] = time.monotonic()
        if job.attempt == 1:
            await database_down.wait()  # finish (fail or succeed) while the database is down
            if job.payload["fail"]:
                raise ConnectionError("router unreachable")

    await pg_worker.install(db_url, ["jobs"])
    observer = RecordingObserver()
    # pool_timeout=1: a write waits at most 1 s for a connection, so the outcomes fail while the database is down.
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES, pool_timeout=1.0, worker_id="a"):
        failing = [producer.enqueue("jobs", {"fail": True}) for _ in range(3)]
        succeeding = [producer.enqueue("jobs", {"fail": False}) for _ in range(3)]
        producer.close()
        await wait_until(lambda: len(starts) == 6, what="six jobs running")
        await asyncio.to_thread(pg_server.pg_ctl, "stop", "-m", "fast", "-w")
        database_down.set()
        await asyncio.sleep(2.0)
        socket_dir = pg_server.handle.get_postmaster_info().socket_dir
        await asyncio.to_thread(pg_server.pg_ctl, "start", "-w", "-o", f"-h '' -k {socket_dir}", "-l", str(pg_server.handle.log))
        back = time.monotonic()
        await wait_until(lambda: all((m, 2) in starts for m in failing), limit=20, what="the failed jobs' second runs")
        await wait_until(lambda: _queue_empty(db_url), limit=10, what="every job acknowledged")
    late = {m: round(starts[(m, 2)] - back, 2) for m in failing}
    assert all(t <= delay + 1.0 for t in late.values()), f"second runs, seconds after the database was back: {late}"
    assert not [key for key in starts if key[0] in succeeding and key[1] > 1], "a success is not run again"
    assert "retry" in observer.db_errors, observer.db_errors


async def _queue_empty(url: str) -> bool:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await (await conn.execute("SELECT count(*) FROM pgmq.q_jobs")).fetchone() == (0,)


async def test_a_message_whose_lease_this_worker_lost_runs_again_at_the_leases_end_not_at_the_poll(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("slow", visibility_timeout=2)
    starts: list[float] = []

    @app.handler("slow")
    async def handle(job: Job[dict[str, Any]]) -> None:
        starts.append(time.monotonic())
        if job.attempt == 1:
            await asyncio.sleep(30)  # stopped when its lease is lost

    await pg_worker.install(db_url, ["slow"])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(FAIL_RENEWALS)
    observer = RecordingObserver()
    url_a = db_url + ("&" if "?" in db_url else "?") + "application_name=worker-a"
    async with running_worker(app, url_a, observer, poll=TEN_MINUTES, worker_id="a"):
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute("INSERT INTO fail_renewals VALUES ('worker-a')")
            producer.enqueue("slow", {})
            await wait_until(lambda: observer.outcomes(Outcome.LEASE_LOST), limit=5, what="the lease lost")
            lost_at = time.monotonic()
            await conn.execute("DELETE FROM fail_renewals")
        await wait_until(lambda: len(starts) == 2, limit=10, what="the second run")
    assert starts[1] - lost_at < 1.5, f"ran again {starts[1] - lost_at:.2f}s after the lease was lost (its end is <= 0.2 s later)"


async def test_a_renewal_that_meets_a_retry_neither_overwrites_its_delay_nor_reports_a_lost_lease(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs", visibility_timeout=4, retry=RetryPolicy(max_attempts=3, base_delay=0.2, max_delay=0.2))
    starts: list[float] = []
    locked = asyncio.Event()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        starts.append(time.monotonic())
        if job.attempt == 1:
            await locked.wait()
            raise ConnectionError("router busy")

    await pg_worker.install(db_url, ["jobs"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES, worker_id="a"):
        msg_id = producer.enqueue("jobs", {})
        await wait_until(lambda: starts, what="first run")
        async with await psycopg.AsyncConnection.connect(db_url) as locker:
            # Hold the row: the retry write queues for it first, then the renewal (due at 2 s) queues behind it.
            await locker.execute("SELECT 1 FROM pgmq.q_jobs WHERE msg_id = %s FOR UPDATE", (msg_id,))
            locked.set()
            await wait_until(lambda: _waiting_on_the_row(db_url, 2), limit=5, what="retry and renewal both waiting")
            await locker.rollback()
        unlocked = time.monotonic()
        await wait_until(lambda: len(starts) == 2, limit=10, what="the retry")
        await asyncio.sleep(0.3)
    assert starts[1] - unlocked < 1.2, f"the retry's 0.2 s delay became {starts[1] - unlocked:.2f}s"
    assert observer.leases_lost == [], "no lease was lost"


async def _waiting_on_the_row(url: str, count: int) -> bool:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (
            await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
        ).fetchone()
        return row is not None and row[0] >= count


async def test_a_job_counts_as_succeeded_only_once_its_acknowledgement_matched(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs", visibility_timeout=20)
    release = asyncio.Event()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        await release.wait()

    await pg_worker.install(db_url, ["jobs"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES, worker_id="a"):
        producer.enqueue("jobs", {})
        await wait_until(lambda: observer.started, what="the job runs")
        await expire(db_url, "jobs")
        await read_one(db_url, "jobs", vt=300)  # another worker has the message now; A has not noticed yet
        release.set()
        await wait_until(lambda: observer.finished, limit=5, what="the job counted")
        await asyncio.sleep(0.2)
    assert [f.outcome for f in observer.finished] == [Outcome.LEASE_LOST], "its acknowledgement matched nothing"
    assert [op for _, _, op in observer.leases_lost] == ["ack"]


async def test_an_async_handler_that_blocks_the_event_loop_is_reported(db_url: str, producer: Producer, caplog: pytest.LogCaptureFixture) -> None:
    app = App()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        time.sleep(1.5)  # noqa: ASYNC251 - the point: blocking work in an async handler

    await pg_worker.install(db_url, ["jobs"])
    caplog.set_level(logging.WARNING, logger="pg_worker")
    async with running_worker(app, db_url, RecordingObserver(), poll=TEN_MINUTES):
        producer.enqueue("jobs", {})
        await wait_until(lambda: [r for r in caplog.records if getattr(r, "event", "") == "event_loop_blocked"], limit=10, what="the warning")
    [record] = [r for r in caplog.records if getattr(r, "event", "") == "event_loop_blocked"]
    assert record.blocked_s > 1.0
