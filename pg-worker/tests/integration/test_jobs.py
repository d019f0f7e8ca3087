"""Jobs reach their handlers with their context; success acknowledges them; producers join transactions."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pydantic
import pytest

import pg_worker
from helpers import RecordingObserver, queue_rows, running_worker, wait_until
from pg_worker import App, AsyncProducer, Job, Outcome, Producer


async def _archived(url: str, queue: str) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT msg_id FROM pgmq.a_{queue} ORDER BY msg_id")
        return [r[0] for r in await cur.fetchall()]


async def test_handler_gets_payload_msg_id_attempt_and_enqueue_time_then_message_is_deleted(db_url: str) -> None:
    app = App()
    seen: list[Job[Any]] = []

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        seen.append(job)

    await pg_worker.install(db_url, ["jobs"])
    before = datetime.now(UTC)
    async with AsyncProducer(db_url) as producer:
        msg_id = await producer.enqueue("jobs", {"customer": 42}, headers={"trace": "abc"})
    await pg_worker.run_worker(app, db_url, stop_when_idle=True)

    assert len(seen) == 1
    job = seen[0]
    assert (job.queue, job.msg_id, job.attempt, job.payload, job.headers) == ("jobs", msg_id, 1, {"customer": 42}, {"trace": "abc"})
    assert before - timedelta(seconds=5) < job.enqueued_at < datetime.now(UTC)
    assert await queue_rows(db_url, "jobs") == []


async def test_archive_on_success_keeps_a_copy(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("kept", on_success="archive")
    app.add_handler("kept", lambda job: None)
    await pg_worker.install(db_url, ["kept"])
    ids = producer.enqueue_many("kept", [{"n": i} for i in range(3)])
    await pg_worker.run_worker(app, db_url, stop_when_idle=True)
    assert await queue_rows(db_url, "kept") == []
    assert await _archived(db_url, "kept") == ids


async def test_sync_handlers_run_in_a_thread_pool_and_async_ones_on_the_loop(db_url: str, producer: Producer) -> None:
    app = App()
    threads: dict[str, str] = {}

    @app.handler("mixed", type="sync")
    def sync_handler(job: Job[dict[str, Any]]) -> None:
        threads["sync"] = threading.current_thread().name

    @app.handler("mixed", type="async")
    async def async_handler(job: Job[dict[str, Any]]) -> None:
        threads["async"] = threading.current_thread().name

    await pg_worker.install(db_url, ["mixed"])
    producer.enqueue("mixed", {}, type="sync")
    producer.enqueue("mixed", {"type": "async"})
    await pg_worker.run_worker(app, db_url, stop_when_idle=True)
    assert threads["sync"].startswith("pg-worker-job")
    assert threads["async"] == threading.current_thread().name


class Activation(pydantic.BaseModel):
    customer_id: int
    service: str


async def test_typed_handlers_receive_their_validated_schema(db_url: str, producer: Producer) -> None:
    app = App()
    got: list[Any] = []

    @app.handler("devices", type="activate", schema=Activation)
    async def activate(job: Job[Activation]) -> None:
        got.append(("activate", job.payload, job.type))

    @app.handler("devices")
    async def fallback(job: Job[dict[str, Any]]) -> None:
        got.append(("fallback", job.payload, job.type))

    await pg_worker.install(db_url, ["devices"])
    producer.enqueue("devices", {"customer_id": 7, "service": "fiber"}, type="activate")
    producer.enqueue("devices", {"note": "x"}, type="audit")
    await pg_worker.run_worker(app, db_url, stop_when_idle=True)
    assert got == [
        ("activate", Activation(customer_id=7, service="fiber"), "activate"),
        ("fallback", {"note": "x", "type": "audit"}, "audit"),
    ]


async def test_enqueue_with_conn_joins_the_callers_transaction_and_a_rollback_is_never_processed(db_url: str) -> None:
    app = App()
    handled: list[Any] = []
    app.add_handler("payments", lambda job: handled.append(job.payload))
    await pg_worker.install(db_url, ["payments"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=pg_worker.PollSchedule(interval=0.2)):
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            await AsyncProducer().enqueue("payments", {"payment": "rolled-back"}, conn=conn)
            await conn.rollback()
            await AsyncProducer().enqueue("payments", {"payment": "committed"}, conn=conn)
            await conn.commit()
        await wait_until(lambda: handled, what="committed job")
        await asyncio.sleep(0.6)  # three poll cycles: a rolled-back message would surface by now
    assert handled == [{"payment": "committed"}]
    assert await queue_rows(db_url, "payments") == []


def test_sync_producer_conn_joins_and_rolls_back(db_url: str) -> None:
    asyncio.run(pg_worker.install(db_url, ["payments"]))
    with psycopg.connect(db_url) as conn:
        Producer().enqueue("payments", {"a": 1}, conn=conn)
        conn.rollback()
        ids = Producer().enqueue_many("payments", [{"b": 1}, {"b": 2}], delay=timedelta(seconds=30), conn=conn)
        conn.commit()
    rows = asyncio.run(queue_rows(db_url, "payments"))
    assert [r[0] for r in rows] == ids
    assert all(r[2] > datetime.now(UTC) + timedelta(seconds=20) for r in rows)


def test_producer_rejects_bad_input_before_touching_the_database() -> None:
    producer = Producer()
    with pytest.raises(pg_worker.InvalidQueueName):
        producer.enqueue("Payments", {})
    with pytest.raises(TypeError, match="JSON object"):
        producer.enqueue("payments", ["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        producer.enqueue("payments", {"when": datetime.now(UTC)})
    with pytest.raises(ValueError, match="delay"):
        producer.enqueue("payments", {}, delay=-1)
    with pytest.raises(ValueError, match="no connection string"):
        producer.enqueue("payments", {})


async def test_two_workers_share_a_queue_without_running_a_message_twice(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("shared", batch_size=5)
    runs: dict[int, int] = {}
    running: set[int] = set()
    overlaps: list[int] = []

    @app.handler("shared")
    async def handle(job: Job[dict[str, Any]]) -> None:
        if job.msg_id in running:
            overlaps.append(job.msg_id)
        running.add(job.msg_id)
        runs[job.msg_id] = runs.get(job.msg_id, 0) + 1
        await asyncio.sleep(0.002)
        running.discard(job.msg_id)

    await pg_worker.install(db_url, ["shared"])
    ids = producer.enqueue_many("shared", [{"n": i} for i in range(300)])
    first, second = RecordingObserver(), RecordingObserver()
    await asyncio.gather(
        pg_worker.run_worker(app, db_url, pg_worker.WorkerConfig(concurrency=8, worker_id="a"), observers=[first], stop_when_idle=True),
        pg_worker.run_worker(app, db_url, pg_worker.WorkerConfig(concurrency=8, worker_id="b"), observers=[second], stop_when_idle=True),
    )
    assert sorted(runs) == ids
    assert set(runs.values()) == {1}
    assert overlaps == []
    assert first.outcomes(Outcome.SUCCEEDED) and second.outcomes(Outcome.SUCCEEDED), "both workers took part"
