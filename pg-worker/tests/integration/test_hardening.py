"""Faults met in production: lost leases, fenced writes, poison messages, stuck threads, isolation levels,
row locks, and handlers that return awaitables (issue: fence every write by its lease)."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

import pg_worker
from helpers import RecordingObserver, dlq_messages, expire, marks, queue_rows, read_one, running_worker, wait_until
from pg_worker import App, Job, Outcome, PollSchedule, Producer, RetryPolicy, WakeupSource, WorkerConfig
from test_resilience import WorkerProcess

TEN_MINUTES = PollSchedule(interval=600)


async def test_a_lost_lease_cancels_the_running_job_before_another_worker_starts_it(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("long", visibility_timeout=2)
    runs: list[tuple[str, str, float]] = []

    @app.handler("long")
    async def handle(job: Job[dict[str, Any]]) -> None:
        me = asyncio.current_task().get_name()  # type: ignore[union-attr]
        runs.append((me, "start", time.monotonic()))
        try:
            await asyncio.sleep(30)
        finally:
            runs.append((me, "end", time.monotonic()))

    await pg_worker.install(db_url, ["long"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES, worker_id="a"):
        producer.enqueue("long", {})
        await wait_until(lambda: runs, what="first run")
        # Another worker takes the message over (as after a network split): A's next renewal matches nothing.
        await expire(db_url, "long")
        await read_one(db_url, "long", vt=300)
        await wait_until(lambda: observer.outcomes(Outcome.LEASE_LOST), timeout=5, what="job stopped")
    assert [what for _, what, _ in runs] == ["start", "end"], "cancelled, never acknowledged"
    assert observer.leases_lost and observer.leases_lost[0][2] == "renew_lease"
    [(_, read_ct, _, _)] = await queue_rows(db_url, "long")
    assert read_ct == 2, "B's delivery is intact"


class _AsyncCallable:
    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    async def __call__(self, job: Job[dict[str, Any]]) -> None:
        await asyncio.sleep(0)
        self.seen.append("object")


async def test_handlers_that_return_awaitables_are_awaited_and_a_returned_generator_is_an_error(db_url: str, producer: Producer) -> None:
    seen: list[str] = []

    async def work(tag: str, job: Job[dict[str, Any]]) -> None:
        await asyncio.sleep(0)
        seen.append(tag)

    app = App()
    app.add_handler("jobs", lambda job: work("lambda", job), type="lambda")
    app.add_handler("jobs", functools.partial(work, "partial"), type="partial")
    app.add_handler("jobs", _AsyncCallable(seen), type="object")
    app.add_handler("jobs", lambda job: (n for n in [42]), type="value")
    assert app.resolve("jobs", {"type": "partial"})[0].is_async
    assert app.resolve("jobs", {"type": "object"})[0].is_async
    await pg_worker.install(db_url, ["jobs"])
    for kind in ("lambda", "partial", "object", "value"):
        producer.enqueue("jobs", {"type": kind})
    await pg_worker.run_worker(app, db_url, WorkerConfig(listen=False), stop_when_idle=True)
    assert sorted(seen) == ["lambda", "object", "partial"]
    [dead] = await dlq_messages(db_url, "jobs")
    assert dead["message"] == {"type": "value"}
    assert dead["error"]["reason"] == "permanent_failure"
    assert "returned a generator" in dead["error"]["message"]


async def test_a_repeatable_read_producer_wakes_a_worker_that_marked_after_its_snapshot(db_url: str) -> None:
    for isolation in ("REPEATABLE READ", "SERIALIZABLE"):
        release = asyncio.Event()
        started: dict[int, float] = {}
        app = App()
        queue = "rr" if isolation == "REPEATABLE READ" else "ser"

        @app.handler(queue)
        async def handle(job: Job[dict[str, Any]], started: dict[int, float] = started, release: asyncio.Event = release) -> None:
            started[job.msg_id] = time.monotonic()
            if job.payload.get("block"):
                await release.wait()

        await pg_worker.install(db_url, [queue])
        async with (
            running_worker(app, db_url, RecordingObserver(), poll=TEN_MINUTES, concurrency=1, worker_id=f"w-{queue}") as worker,
            await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn,
        ):
            await conn.execute("SELECT pgmq.send(%s, '{\"block\": true}')", (queue,))
            await wait_until(lambda started=started: started, what="blocking job")
            assert await marks(db_url, worker.config.worker_id) == 0
            async with await psycopg.AsyncConnection.connect(db_url) as producer:
                await producer.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
                await producer.execute("SELECT 1")  # the snapshot is taken now, before the worker marks itself
                release.set()
                await wait_until(lambda worker=worker: _marked(db_url, worker.config.worker_id), what="worker asleep")
                cur = await producer.execute("SELECT pgmq.send(%s, '{}')", (queue,))
                row = await cur.fetchone()
                assert row is not None
                await producer.commit()
                committed = time.monotonic()
            await wait_until(lambda row=row, started=started: row[0] in started, timeout=3, what=f"{isolation} producer's message")
            assert started[row[0]] - committed < 0.5, f"{isolation}: woken by its notification, not by a poll"


async def _marked(url: str, worker_id: str) -> bool:
    return await marks(url, worker_id) > 0


def _markers(work_dir: Path, what: str) -> set[int]:
    return {int(p.name.split("-")[1]) for p in work_dir.glob(f"{what}-*")}


async def restart_poison_app_until_drained(db_url: str, work_dir: Path) -> None:
    """Start ``apps:poison_app`` processes one after the other, each until it dies (on the poison message) or the
    ``batch`` queue is empty, for at most 60 s; more than 6 processes means the poison was never isolated."""
    runs = 0
    deadline = time.monotonic() + 60
    while await queue_rows(db_url, "batch") and time.monotonic() < deadline:
        worker = WorkerProcess(db_url, work_dir, app="apps:poison_app", PG_WORKER_CONCURRENCY="10")
        runs += 1
        try:
            for _ in range(300):  # the process dies on the poison message, or drains the queue
                if worker.proc.poll() is not None or not await queue_rows(db_url, "batch"):
                    break
                await asyncio.sleep(0.05)
        finally:
            worker.kill()
        assert runs <= 6, "the poison message must be isolated after a few deaths"


async def test_a_poison_message_reaches_the_dlq_alone_and_its_batch_mates_run(db_url: str, tmp_path: Path, producer: Producer) -> None:
    await pg_worker.install(db_url, ["batch"])
    innocent = [producer.enqueue("batch", {"n": n}) for n in range(4)]
    poison = producer.enqueue("batch", {"poison": True})
    await restart_poison_app_until_drained(db_url, tmp_path)
    done = _markers(tmp_path, "done")
    assert done == set(innocent), "every batch-mate ran to completion"
    dead_letters = await dlq_messages(db_url, "batch")
    assert [d["msg_id"] for d in dead_letters] == [poison], dead_letters
    assert dead_letters[0]["error"]["reason"] == "killed_worker"
    assert "x-pg-worker-solo" not in (dead_letters[0]["headers"] or {})


async def test_a_sync_job_past_its_timeout_keeps_its_lease_until_the_thread_returns(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("sync", visibility_timeout=1, job_timeout=0.3, retry=RetryPolicy(max_attempts=1))
    runs: list[float] = []

    @app.handler("sync")
    def handle(job: Job[dict[str, Any]]) -> None:
        runs.append(time.monotonic())
        time.sleep(2.5)

    await pg_worker.install(db_url, ["sync"])
    fast_poll = PollSchedule(interval=0.2)
    async with running_worker(app, db_url, RecordingObserver(), poll=fast_poll, worker_id="a") as a, running_worker(
        app, db_url, RecordingObserver(), poll=fast_poll, worker_id="b"
    ) as b:
        producer.enqueue("sync", {})
        await wait_until(lambda: runs, what="job started")
        await wait_until(lambda: a.health.stuck_sync_jobs + b.health.stuck_sync_jobs == 1, what="stuck thread reported")
        await wait_until(lambda: dlq_messages(db_url, "sync"), timeout=10, what="dead letter after the thread returned")
        assert time.monotonic() - runs[0] >= 2.4, "not dead-lettered while the thread still ran"
    assert len(runs) == 1, "never made visible (nor run elsewhere) while the thread ran"
    [dead] = await dlq_messages(db_url, "sync")
    assert dead["error"]["type"] == "pg_worker.JobTimeout"


async def test_a_row_locked_visible_message_does_not_spin_the_fetch_loop(db_url: str, producer: Producer) -> None:
    app = App()
    app.add_handler("locked", lambda job: None)
    await pg_worker.install(db_url, ["locked"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES), await psycopg.AsyncConnection.connect(db_url) as locker:
        msg_id = producer.enqueue("locked", {}, delay=0.5)
        await locker.execute("SELECT 1 FROM pgmq.q_locked WHERE msg_id = %s FOR UPDATE", (msg_id,))
        await asyncio.sleep(0.6)
        ticks = observer.loop_ticks
        await asyncio.sleep(1.0)
        spins = observer.loop_ticks - ticks
        await locker.rollback()
        await wait_until(lambda: observer.outcomes(Outcome.SUCCEEDED), timeout=3, what="job once the lock is gone")
    assert spins < 30, f"{spins} reads in a second while the only visible message was locked"


async def test_a_dead_letter_masks_secrets_in_the_error_it_stores(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs", retry=RetryPolicy(max_attempts=1))

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        raise ConnectionError("cannot reach postgresql://admin:hunter2@10.0.0.1/db with password=hunter2")

    await pg_worker.install(db_url, ["jobs"])
    producer.enqueue("jobs", {})
    await pg_worker.run_worker(app, db_url, WorkerConfig(listen=False), stop_when_idle=True)
    [dead] = await dlq_messages(db_url, "jobs")
    stored = str(Jsonb(dead["error"]).obj)
    assert "hunter2" not in stored
    assert "[redacted]" in dead["error"]["message"]


async def test_a_failure_whose_retry_cannot_be_recorded_is_reported_as_failed(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs", visibility_timeout=30)

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        if job.attempt == 1:
            # The database refuses the worker's writes while the handler runs: recording the retry fails.
            async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
                await conn.execute("INSERT INTO refuse_retries VALUES (true)")
            raise TimeoutError("router slow")

    await pg_worker.install(db_url, ["jobs"])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(REFUSE_RETRIES)
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES):
        producer.enqueue("jobs", {})
        await wait_until(lambda: observer.finished, timeout=10, what="the first attempt")
        assert "retry" in observer.db_errors
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute("DELETE FROM refuse_retries")  # the database is back...
        # ...and the retry kept since is written then: the job runs again after its delay, not after its lease.
        await wait_until(lambda: observer.outcomes(Outcome.SUCCEEDED), timeout=10, what="second attempt")
    assert [f.outcome for f in observer.finished] == [Outcome.FAILED, Outcome.SUCCEEDED]


# A retry (an UPDATE that closes the delivery) fails while refuse_retries has a row.
REFUSE_RETRIES = """
CREATE TABLE refuse_retries (on_ boolean);
CREATE FUNCTION refuse_retry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.headers ? 'x-pg-worker-closed' AND EXISTS (SELECT 1 FROM refuse_retries) THEN
        RAISE EXCEPTION 'writes refused (test)';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_retry BEFORE UPDATE ON pgmq.q_jobs FOR EACH ROW EXECUTE FUNCTION refuse_retry();
"""


async def test_an_idle_worker_does_not_wake_at_every_renewal_of_another_workers_long_job(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("long", visibility_timeout=1)
    release = asyncio.Event()

    @app.handler("long")
    async def handle(job: Job[dict[str, Any]]) -> None:
        await release.wait()

    await pg_worker.install(db_url, ["long"])
    busy, idle = RecordingObserver(), RecordingObserver()
    async with running_worker(app, db_url, busy, poll=TEN_MINUTES, worker_id="busy"):
        producer.enqueue("long", {})
        await wait_until(lambda: busy.started, what="long job")
        async with running_worker(app, db_url, idle, poll=TEN_MINUTES, worker_id="idle"):
            await asyncio.sleep(4.5)  # the lease is renewed every 0.5 s meanwhile
            wakeups = [s for _, s, _ in idle.wakeups if s is not WakeupSource.STARTUP]
        release.set()
        await wait_until(lambda: busy.outcomes(Outcome.SUCCEEDED), what="long job done")
    assert len(wakeups) <= 2, f"{len(wakeups)} wakeups of an idle worker in 4.5 s (at the lease end, then backing off)"
    assert not idle.started, "and it never ran the held job"
