"""An idle worker with default settings stays off the database: at most 2 transactions a minute."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

import pg_worker
from conftest import PgServer
from helpers import RecordingObserver, running_worker
from pg_worker import App

STATS_FLUSH = 11.5  # backends flush their transaction counters at least every 10 s while idle


async def _commits(pg_server: PgServer, db_name: str) -> int:
    # Read from another database, so that reading does not add to the count being read.
    async with await psycopg.AsyncConnection.connect(pg_server.url("postgres"), autocommit=True) as conn:
        cur = await conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (db_name,))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_idle_worker_issues_at_most_two_transactions_per_minute(pg_server: PgServer, db_name: str, db_url: str) -> None:
    app = App()
    app.add_handler("jobs", lambda job: None)
    app.add_handler("other", lambda job: None)
    await pg_worker.install(db_url, ["jobs", "other"])
    window = 40.0
    async with running_worker(app, db_url, RecordingObserver()):  # default poll: every 60 s
        await asyncio.sleep(STATS_FLUSH)
        before = await _commits(pg_server, db_name)
        await asyncio.sleep(window)
        await asyncio.sleep(STATS_FLUSH)
        after = await _commits(pg_server, db_name)
    used = after - before
    # One poll statement covers both queues, every 54-60 s: a 40 s window (+ flush lag) holds at most one.
    assert used <= 1, f"{used} transactions in {window + STATS_FLUSH:.0f}s while idle"
