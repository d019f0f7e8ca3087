"""Wakeups: NOTIFY latency, poll-only mode, timers for delayed messages, racing producers, trigger costs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

import pg_worker
from helpers import RecordingObserver, marks, running_worker, wait_until
from pg_worker import App, Job, Outcome, PollSchedule, Producer, WakeupSource

TEN_MINUTES = PollSchedule(interval=600)


def _timing_app(queue: str, started: dict[int, float], release: asyncio.Event | None = None) -> App:
    app = App()

    @app.handler(queue)
    async def handle(job: Job[dict[str, Any]]) -> None:
        started[job.msg_id] = time.monotonic()
        if release is not None and job.payload.get("block"):
            await release.wait()

    return app


async def test_notify_starts_the_handler_within_100ms_while_the_poll_is_10_minutes(db_url: str, producer: Producer) -> None:
    started: dict[int, float] = {}
    app = _timing_app("fast", started)
    await pg_worker.install(db_url, ["fast"])
    observer = RecordingObserver()
    latencies = []
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES) as worker:
        for _ in range(5):
            await wait_until(lambda: _all_marked(db_url, worker), what="worker back to sleep")
            sent = time.monotonic()
            msg_id = await asyncio.to_thread(producer.enqueue, "fast", {"n": 1})
            await wait_until(lambda m=msg_id: m in started, timeout=2, interval=0.001, what="handler start")
            latencies.append(started[msg_id] - sent)
    assert max(latencies) < 0.100, latencies
    assert {s for _, s, _ in observer.wakeups} == {WakeupSource.STARTUP, WakeupSource.NOTIFY}


async def _all_marked(url: str, worker: pg_worker.Worker) -> bool:
    return await marks(url, worker.config.worker_id) == len(worker.app.queues)


async def test_poll_only_mode_works_without_listen(db_url: str, producer: Producer) -> None:
    started: dict[int, float] = {}
    app = _timing_app("polled", started)
    await pg_worker.install(db_url, ["polled"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, listen=False, poll=PollSchedule(interval=0.3)):
        msg_id = producer.enqueue("polled", {})
        await wait_until(lambda: msg_id in started, timeout=3, what="polled job")
        assert await marks(db_url) == 0, "poll-only workers never ask producers to notify"
    assert observer.notifications == 0
    assert WakeupSource.NOTIFY not in {s for _, s, _ in observer.wakeups}


async def test_delayed_message_is_picked_up_when_it_becomes_visible(db_url: str, producer: Producer) -> None:
    started: dict[int, float] = {}
    app = _timing_app("later", started)
    await pg_worker.install(db_url, ["later"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES):
        sent = time.monotonic()
        msg_id = producer.enqueue("later", {}, delay=1.0)
        await wait_until(lambda: msg_id in started, timeout=5, what="delayed job")
    assert 1.0 <= started[msg_id] - sent < 1.5
    assert WakeupSource.TIMER in {s for _, s, _ in observer.wakeups}


async def test_a_producer_that_raced_with_the_worker_going_to_sleep_is_caught_within_the_bound(db_url: str) -> None:
    """The producer checks for a waiting worker before the worker's mark is committed: no NOTIFY is sent,
    and the worker's re-check of in-flight transactions must find the message within the bound."""
    release = asyncio.Event()
    started: dict[int, float] = {}
    app = _timing_app("race", started, release)
    await pg_worker.install(db_url, ["race"])
    observer = RecordingObserver()
    bound = 0.5
    async with (
        running_worker(app, db_url, observer, poll=TEN_MINUTES, concurrency=1, missed_wakeup_bound=bound) as worker,
        await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn,
    ):
            await conn.execute("SELECT pgmq.send('race', '{\"block\": true}')")
            await wait_until(lambda: started, what="blocking job")  # the only slot is taken, the mark withdrawn
            assert await marks(db_url) == 0
            producer = await psycopg.AsyncConnection.connect(db_url)
            async with producer:
                cur = await producer.execute("SELECT pgmq.send('race', '{}')")  # trigger sees no waiting worker
                row = await cur.fetchone()
                assert row is not None
                raced_id = row[0]
                release.set()  # the worker drains (our row is invisible), marks itself, checks, sleeps
                await wait_until(lambda: _all_marked(db_url, worker), what="worker asleep")
                await asyncio.sleep(0.05)
                notifications_before = observer.notifications
                await producer.commit()
                committed = time.monotonic()
            await wait_until(lambda: raced_id in started, timeout=bound + 2, what="raced message")
    assert observer.notifications == notifications_before, "the raced message sent no notification"
    assert started[raced_id] - committed <= bound + 0.1
    assert WakeupSource.RECHECK in {s for _, s, _ in observer.wakeups}


async def _count_notifications(url: str, channel: str, action: Any) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as listener:
        await listener.execute(f"LISTEN {channel}")
        await action()
        received = 0
        async for _ in listener.notifies(timeout=0.5):
            received += 1
        return received


async def test_a_batch_send_notifies_once_and_nobody_is_notified_when_no_worker_waits(db_url: str) -> None:
    await pg_worker.install(db_url, ["batch"])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:

        async def send_batch() -> None:
            await conn.execute("SELECT pgmq.send_batch('batch', array_fill('{}'::jsonb, ARRAY[500]))")

        assert await _count_notifications(db_url, "pg_worker_batch", send_batch) == 0, "no waiting worker: no NOTIFY"
        await conn.execute("INSERT INTO pgworker.waiters (queue_name, worker_id, listener_pid) VALUES ('batch', 'w', pg_backend_pid())")
        assert await _count_notifications(db_url, "pg_worker_batch", send_batch) == 1


async def test_concurrent_producers_never_wait_on_each_other(db_url: str) -> None:
    """pgmq's own notify trigger makes the second producer wait for the first one's commit (a shared row lock)."""
    await pg_worker.install(db_url, ["busy"])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("INSERT INTO pgworker.waiters (queue_name, worker_id, listener_pid) VALUES ('busy', 'w', pg_backend_pid())")
    async with await psycopg.AsyncConnection.connect(db_url) as first, await psycopg.AsyncConnection.connect(db_url) as second:
        await first.execute("SELECT pgmq.send('busy', '{}')")  # open transaction, not committed
        await second.execute("SET lock_timeout = '500ms'")
        await second.execute("SELECT pgmq.send('busy', '{}')")
        await second.commit()
        await first.commit()


@pytest.mark.parametrize("trigger", ["pgmq_throttled"])
async def test_pgmq_own_notify_trigger_does_block_producers_for_contrast(db_url: str, trigger: str) -> None:
    """The contrast case for the test above, so it is known to be able to fail."""
    await pg_worker.install(db_url, ["contrast"])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("SELECT pgmq.enable_notify_insert('contrast', 0)")
    async with await psycopg.AsyncConnection.connect(db_url) as first, await psycopg.AsyncConnection.connect(db_url) as second:
        await first.execute("SELECT pgmq.send('contrast', '{}')")
        await second.execute("SET lock_timeout = '300ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            await second.execute("SELECT pgmq.send('contrast', '{}')")
        await first.rollback()


async def test_notify_wakeups_never_outnumber_the_notifications_under_a_steady_trickle(db_url: str) -> None:
    """Re-drains after a check found new work are not wakeups: each wakeup is counted once, by its source."""
    app = App()
    app.queue("trickle", batch_size=5)

    @app.handler("trickle")
    async def handle(job: Job[dict[str, Any]]) -> None:
        await asyncio.sleep(0.002)

    await pg_worker.install(db_url, ["trickle"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES, concurrency=10):
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            for _ in range(150):  # bounded: 150 messages, about one every 4 ms
                await conn.execute("SELECT pgmq.send('trickle', '{}')")
                await asyncio.sleep(0.004)
        await wait_until(lambda: len(observer.outcomes(Outcome.SUCCEEDED)) == 150, timeout=20, what="all jobs")
    sources = [s for _, s, _ in observer.wakeups]
    assert sources.count(WakeupSource.STARTUP) == 1
    assert sources.count(WakeupSource.NOTIFY) <= observer.notifications


async def test_the_recheck_judges_running_producers_in_its_own_snapshot(db_url: str) -> None:
    """Forced interleaving: a producer commits after the re-check's snapshot was taken. A live status check would
    call it finished while its message is still invisible to the snapshot (a missed wakeup)."""
    from pg_worker._sql import recheck

    await pg_worker.install(db_url, ["snap"])
    async with await psycopg.AsyncConnection.connect(db_url) as producer, await psycopg.AsyncConnection.connect(db_url) as checker:
        await producer.execute("SELECT pgmq.send('snap', '{}')")
        cur = await producer.execute("SELECT pg_current_xact_id()::text")
        row = await cur.fetchone()
        assert row is not None
        xid = row[0]
        # The re-check's snapshot, taken while the producer runs (REPEATABLE READ pins it for the next statement).
        await checker.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        await checker.execute("SELECT 1")
        await producer.commit()
        cur = await checker.execute(recheck("snap"), {"xids": [xid]})
        checked = await cur.fetchone()
        assert checked is not None
        in_flight, next_vt = checked[0], checked[1]
        await checker.rollback()
    assert next_vt is None, "the snapshot does not see the message..."
    assert in_flight == [xid], "...so the producer must still count as running, and the worker re-check again"


async def test_a_message_with_an_absurd_visibility_time_does_not_break_the_sleep_check(db_url: str, producer: Producer) -> None:
    started: dict[int, float] = {}
    app = _timing_app("absurd", started)
    await pg_worker.install(db_url, ["absurd"])
    stuck = producer.enqueue("absurd", {})
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE pgmq.q_absurd SET vt = 'infinity' WHERE msg_id = %s", (stuck,))
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES):
        msg_id = producer.enqueue("absurd", {})
        await wait_until(lambda: msg_id in started, timeout=3, what="the other message")
    assert stuck not in started
    assert "check" not in observer.db_errors, observer.db_errors
