"""Poison detection for every message: any JSON as headers, an exhausted read count, a dropped dead-letter queue
(issue 18, item 5). Each ends in a clear, counted, logged state; nothing is lost."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_hardening import restart_poison_app_until_drained

import pg_worker
from helpers import RecordingObserver, dlq_messages, queue_rows, running_worker, wait_until
from pg_worker import App, Job, Outcome, PermanentFailure, PollSchedule, Producer, RetryPolicy

TEN_MINUTES = PollSchedule(interval=600)
ODD_HEADERS = ["null", "[1, \"two\"]", "\"a string\""]


async def _send(url: str, queue: str, message: str, headers: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (await conn.execute("SELECT pgmq.send(%s, %s::jsonb, %s::jsonb)", (queue, message, headers))).fetchone()
        assert row is not None
        return int(row[0])


async def test_headers_that_are_not_an_object_still_record_retries_and_reach_the_dlq_as_sent(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    app.queue("jobs", visibility_timeout=2, retry=RetryPolicy(max_attempts=5, base_delay=0.05, max_delay=0.05))
    seen: list[tuple[int, int, Any]] = []

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        seen.append((job.msg_id, job.attempt, job.headers))
        if job.attempt == 1:
            raise ConnectionError("router busy")
        raise PermanentFailure("bad request")

    await pg_worker.install(db_url, ["jobs"])
    ids = {await _send(db_url, "jobs", "{}", headers): headers for headers in ODD_HEADERS}
    observer = RecordingObserver()
    caplog.set_level(logging.INFO, logger="pg_worker")
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES):
        await wait_until(lambda: len(observer.outcomes(Outcome.DEAD_LETTERED)) == 3, limit=10, what="three dead letters")
        await asyncio.sleep(2.5)  # a message that failed to move would come back after its lease (2 s)

    assert sorted((m, a) for m, a, _ in seen) == sorted((m, a) for m in ids for a in (1, 2)), "each ran twice, no more"
    assert all(h == json.loads(ids[m]) for m, _, h in seen), "handlers see the headers as sent"
    assert not [r for r in caplog.records if getattr(r, "event", "") == "suspect_running"], "a recorded retry is no suspect"
    dead = {d["msg_id"]: d for d in await dlq_messages(db_url, "jobs")}
    assert {m: dead[m]["headers"] for m in ids} == {m: json.loads(h) for m, h in ids.items()}
    assert await queue_rows(db_url, "jobs") == []


async def test_a_poison_message_with_odd_headers_is_dead_lettered(db_url: str, tmp_path: Path, producer: Producer) -> None:
    await pg_worker.install(db_url, ["batch"])
    innocent = producer.enqueue("batch", {"n": 1})
    poison = await _send(db_url, "batch", '{"poison": true}', '"not an object"')
    await restart_poison_app_until_drained(db_url, tmp_path)
    [dead] = await dlq_messages(db_url, "batch")
    assert (dead["msg_id"], dead["error"]["reason"], dead["headers"]) == (poison, "killed_worker", "not an object")
    assert _ran_to_the_end(tmp_path, innocent), "its batch-mate ran"


def _ran_to_the_end(work_dir: Path, msg_id: int) -> bool:
    return any(work_dir.glob(f"done-{msg_id}-*"))


async def test_a_message_at_the_largest_read_count_is_dead_lettered_unrun_and_its_queue_still_flows(db_url: str, producer: Producer) -> None:
    app = App()
    ran: list[int] = []

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        ran.append(job.msg_id)

    await pg_worker.install(db_url, ["jobs"])
    stuck = producer.enqueue("jobs", {"n": 0})
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("UPDATE pgmq.q_jobs SET read_ct = 2147483647 WHERE msg_id = %s", (stuck,))
    later = [producer.enqueue("jobs", {"n": n}) for n in range(1, 4)]
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES, listen=False):
        await wait_until(lambda: len(ran) == 3, limit=10, what="the queue's other messages")
        await wait_until(lambda: observer.rejected, limit=5, what="the exhausted message rejected")
    assert sorted(ran) == later, "it never ran"
    assert observer.rejected == [("jobs", stuck, "read_ct_exhausted")]
    [dead] = await dlq_messages(db_url, "jobs")
    assert dead["msg_id"] == stuck and dead["error"]["reason"] == "read_ct_exhausted"


async def test_a_dlq_dropped_under_a_running_worker_is_created_again_and_the_failure_moved_there(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs", visibility_timeout=1)
    runs: list[int] = []

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        runs.append(job.msg_id)
        raise PermanentFailure("never works")

    await pg_worker.install(db_url, ["jobs"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=PollSchedule(interval=0.5)):
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute("SELECT pgmq.drop_queue('jobs_dlq')")
        msg_id = producer.enqueue("jobs", {})
        await wait_until(lambda: observer.finished, limit=5, what="the job failed")
        await asyncio.sleep(2.0)  # a message that failed to move comes back after its lease (1 s) and runs again
    assert runs == [msg_id], "PermanentFailure: run once"
    assert [f.outcome for f in observer.finished] == [Outcome.DEAD_LETTERED]
    assert "dead_letter" in observer.db_errors, "the missing DLQ is counted"
    [dead] = await dlq_messages(db_url, "jobs")
    assert dead["msg_id"] == msg_id
    assert await queue_rows(db_url, "jobs") == []
