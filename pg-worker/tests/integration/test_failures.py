"""Failures: retries with backoff, retry-later, permanent failures, bad messages and the dead-letter queue."""

from __future__ import annotations

import itertools
import time
from typing import Any

import psycopg
import pydantic
import pytest

import pg_worker
from helpers import RecordingObserver, dlq_messages, queue_rows, running_worker, wait_until
from pg_worker import App, Job, Outcome, PermanentFailure, Producer, RetryLater, RetryPolicy

FAST = {"poll": pg_worker.PollSchedule(interval=600)}


class DeviceDown(Exception):
    pass


async def test_failing_job_is_retried_with_growing_delays_then_dead_lettered_with_its_error(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("flaky", retry=RetryPolicy(max_attempts=4, base_delay=0.1, jitter=0.0))
    attempts: list[tuple[int, float]] = []

    @app.handler("flaky")
    async def handle(job: Job[dict[str, Any]]) -> None:
        attempts.append((job.attempt, time.monotonic()))
        raise DeviceDown(f"router 10.0.0.1 unreachable (attempt {job.attempt})")

    await pg_worker.install(db_url, ["flaky"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, **FAST):
        msg_id = producer.enqueue("flaky", {"customer": 1})
        await wait_until(lambda: observer.outcomes(Outcome.DEAD_LETTERED), what="dead letter")

    assert [a for a, _ in attempts] == [1, 2, 3, 4]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
    # backoff 0.1, 0.2, 0.4 s: each wait at least its delay (timers, not polls, bring retries back)
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert expected <= gap < expected + 0.5, gaps
    assert [f.outcome for f in observer.finished] == [Outcome.RETRIED] * 3 + [Outcome.DEAD_LETTERED]
    assert await queue_rows(db_url, "flaky") == []
    [dead] = await dlq_messages(db_url, "flaky")
    assert dead["queue"] == "flaky"
    assert dead["msg_id"] == msg_id
    assert dead["message"] == {"customer": 1}
    assert dead["attempts"] == 4
    assert dead["error"]["reason"] == "max_attempts"
    assert dead["error"]["type"].endswith("DeviceDown")
    assert "attempt 4" in dead["error"]["message"]
    assert "raise DeviceDown" in dead["error"]["traceback"]
    assert dead["enqueued_at"] and dead["failed_at"]


async def test_retry_later_uses_the_requested_delay(db_url: str, producer: Producer) -> None:
    app = App()
    calls: list[float] = []

    @app.handler("later")
    async def handle(job: Job[dict[str, Any]]) -> None:
        calls.append(time.monotonic())
        if job.attempt == 1:
            raise RetryLater(0.5, "device busy")

    await pg_worker.install(db_url, ["later"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, **FAST):
        producer.enqueue("later", {})
        await wait_until(lambda: observer.outcomes(Outcome.SUCCEEDED), what="second attempt")
    assert 0.5 <= calls[1] - calls[0] < 1.0


async def test_permanent_failure_goes_straight_to_the_dlq(db_url: str, producer: Producer) -> None:
    app = App()
    calls = []

    @app.handler("strict")
    async def handle(job: Job[dict[str, Any]]) -> None:
        calls.append(job.attempt)
        raise PermanentFailure("customer 9 does not exist")

    await pg_worker.install(db_url, ["strict"])
    producer.enqueue("strict", {"customer": 9})
    await pg_worker.run_worker(app, db_url, stop_when_idle=True)
    assert calls == [1]
    [dead] = await dlq_messages(db_url, "strict")
    assert dead["error"]["reason"] == "permanent_failure"
    assert dead["error"]["message"] == "customer 9 does not exist"


class Payload(pydantic.BaseModel):
    customer_id: int


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("[1, 2, 3]", "not_an_object"),
        ('"just a string"', "not_an_object"),
        ("null", "not_an_object"),
        ('{"type": "reboot"}', "unknown_type"),
        ('{"type": 5}', "invalid_type"),
        ('{"type": "activate", "customer_id": "abc"}', "invalid_payload"),
    ],
)
async def test_bad_messages_go_to_the_dlq_at_once_without_reaching_a_handler(db_url: str, message: str, reason: str) -> None:
    app = App()
    called = []

    @app.handler("devices", type="activate", schema=Payload)
    async def activate(job: Job[Payload]) -> None:
        called.append(job.msg_id)

    await pg_worker.install(db_url, ["devices"])
    with psycopg.connect(db_url, autocommit=True) as conn:
        # raw pgmq sends: what a foreign producer might put on the queue
        conn.execute("SELECT pgmq.send('devices', %s::jsonb)", (message,))
        conn.execute("""SELECT pgmq.send('devices', '{"type": "activate", "customer_id": 3}'::jsonb)""")
    observer = RecordingObserver()
    await pg_worker.run_worker(app, db_url, observers=[observer], stop_when_idle=True)
    assert called == [2], "the good message after the bad one is still handled"
    assert [(q, m, r) for q, m, r in observer.rejected] == [("devices", 1, reason)]
    [dead] = await dlq_messages(db_url, "devices")
    assert dead["error"]["reason"] == reason
    assert dead["attempts"] == 1
    assert await queue_rows(db_url, "devices") == []


async def test_job_timeout_cancels_the_handler_and_counts_as_a_failure(db_url: str, producer: Producer) -> None:
    import asyncio

    app = App()
    app.queue("slow", job_timeout=0.2, retry=RetryPolicy(max_attempts=1))

    @app.handler("slow")
    async def handle(job: Job[dict[str, Any]]) -> None:
        await asyncio.sleep(10)

    await pg_worker.install(db_url, ["slow"])
    producer.enqueue("slow", {})
    started = time.monotonic()
    await pg_worker.run_worker(app, db_url, stop_when_idle=True)
    assert time.monotonic() - started < 5
    [dead] = await dlq_messages(db_url, "slow")
    assert dead["error"]["type"] == "pg_worker.JobTimeout"
    assert "0.2s" in dead["error"]["message"]
