"""Start-up as an operator meets it: a database never installed, a wrong database, an unreachable server."""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pg_worker
from helpers import RecordingObserver
from pg_worker import App, Producer, SetupError, WakeupSource, Worker, WorkerConfig


def _app() -> App:
    app = App()
    app.add_handler("jobs", lambda job: None)
    return app


async def test_a_database_where_install_never_ran_is_installed_at_start_up(empty_db_url: str) -> None:
    await asyncio.wait_for(pg_worker.run_worker(_app(), empty_db_url, WorkerConfig(worker_id="fresh"), stop_when_idle=True), timeout=30)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pgmq.meta WHERE queue_name IN ('jobs', 'jobs_dlq')").fetchone()
    assert row == (2,)


async def test_a_missing_database_is_a_permanent_error_with_the_servers_reason(db_url: str) -> None:
    params = conninfo_to_dict(db_url)
    missing = make_conninfo(db_url, dbname="no_such_db_here")
    started = time.monotonic()
    with pytest.raises(SetupError, match='database "no_such_db_here" does not exist'):
        await asyncio.wait_for(Worker(_app(), missing, WorkerConfig(worker_id="w")).run(), timeout=20)
    assert time.monotonic() - started < 3, "not retried"
    assert params["dbname"] != "no_such_db_here"


async def test_an_unreachable_server_is_logged_at_once_with_the_reason_and_stop_ends_the_retries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    worker = Worker(_app(), "host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2", WorkerConfig(worker_id="w"))
    task = asyncio.create_task(worker.run())
    started = time.monotonic()
    while not any("refused" in str(getattr(r, "error", "")).lower() for r in caplog.records):
        assert time.monotonic() - started < 1.0, [getattr(r, "error", r.getMessage()) for r in caplog.records]
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    worker.request_stop()
    stop_asked = time.monotonic()
    await asyncio.wait_for(task, timeout=5)
    assert time.monotonic() - stop_asked < 1.0


async def test_each_wakeup_is_counted_once_by_its_source(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs", batch_size=10)
    app.add_handler("jobs", lambda job: None)
    await pg_worker.install(db_url, ["jobs"])
    producer.enqueue_many("jobs", [{"n": n} for n in range(250)])
    observer = RecordingObserver()
    await pg_worker.run_worker(app, db_url, WorkerConfig(concurrency=20, worker_id="count"), observers=[observer], stop_when_idle=True)
    assert [s for _, s, _ in observer.wakeups] == [WakeupSource.STARTUP], "25 reads after one start-up are one wakeup"
