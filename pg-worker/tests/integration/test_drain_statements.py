"""The drain's statements (issue 18, item 8): each read deletes the batch finished before it, so a queue of quick
jobs costs one statement per batch, not a read and a separate DELETE; and the next read is on its way while a
batch runs, also when reads in flight are killed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

import pg_worker
from helpers import RecordingObserver, dlq_messages, queue_rows, running_worker, wait_until
from pg_worker import App, Job
from pg_worker._app import QueueConfig
from pg_worker._db import Database
from pg_worker._leases import Lease, LeaseKeeper

JOBS = 3000


def _opening(query: Any) -> str:
    """The first 40 characters of a statement, whitespace folded: enough to tell a read from an acknowledgement."""
    text = query.decode() if isinstance(query, bytes) else str(query)
    return " ".join(text.split())[:40]


async def test_a_drain_sends_almost_no_acknowledgement_of_its_own(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = App()
    done: list[int] = []

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        done.append(job.msg_id)

    await pg_worker.install(db_url, ["jobs"])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("SELECT pgmq.send_batch('jobs', array_fill('{}'::jsonb, ARRAY[%s]))", (JOBS,))
    statements: list[str] = []
    original = Database._fetchall

    async def counting(self: Database, query: Any, params: Any, *, fetch: bool = True) -> list[Any]:
        statements.append(_opening(query))
        return await original(self, query, params, fetch=fetch)

    monkeypatch.setattr(Database, "_fetchall", counting)
    await pg_worker.run_worker(app, db_url, stop_when_idle=True)
    assert len(set(done)) == JOBS
    reads = sum(1 for s in statements if s.startswith("WITH acked AS"))
    separate_acks = sum(1 for s in statements if s.startswith("DELETE FROM pgmq"))
    assert reads >= JOBS // 50
    # Before: about one separate DELETE for every two reads (the acknowledger won the race with the next read).
    assert separate_acks <= 3, f"{separate_acks} separate acknowledgements for {reads} reads"


async def test_the_next_read_is_on_its_way_while_a_batch_runs(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server reads batch N+1 while the jobs of batch N run: the read goes out before any of those jobs
    is even made (its lease held, its task created). Sent after them, worker and server waited for each other
    in turn: the drain ran at 0.43x of the raw loop, 0.51x with the read sent after the leases, 0.57x now."""
    app = App()
    order: list[tuple[str, int]] = []

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        order.append(("job", job.msg_id))

    await pg_worker.install(db_url, ["jobs"])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("SELECT pgmq.send_batch('jobs', array_fill('{}'::jsonb, ARRAY[%s]))", (JOBS,))
    original = Database._fetchall

    async def recording(self: Database, query: Any, params: Any, *, fetch: bool = True) -> list[Any]:
        reading = _opening(query).startswith("WITH acked AS")
        if reading:
            order.append(("read sent", 0))  # the statement's first step: psycopg writes it before it awaits
        rows = await original(self, query, params, fetch=fetch)
        if reading:
            order.append(("read back", sum(1 for row in rows if row[1] is not None)))
        return rows

    hold = LeaseKeeper.hold

    def holding(self: LeaseKeeper, queue: QueueConfig, msg_id: int, read_ct: int, sent_at: float) -> Lease:
        order.append(("lease", msg_id))
        return hold(self, queue, msg_id, read_ct, sent_at)

    monkeypatch.setattr(Database, "_fetchall", recording)
    monkeypatch.setattr(LeaseKeeper, "hold", holding)
    await pg_worker.run_worker(app, db_url, stop_when_idle=True)
    assert len({msg_id for kind, msg_id in order if kind == "job"}) == JOBS
    # For every full batch but the last: between its read coming back and its first lease, the next read went out.
    checked = overlapped = 0
    for index, (kind, rows) in enumerate(order):
        if kind != "read back" or rows < 50:
            continue
        following = [event for event, _ in order[index + 1 :] if event in ("lease", "read sent")][:1]
        if following:
            checked += 1
            overlapped += following == ["read sent"]
    assert checked >= JOBS // 50 - 1
    assert overlapped >= checked - 1, f"the next read went out before the batch's leases after only {overlapped} of {checked} full reads"


async def test_a_bug_while_starting_a_batch_stops_the_worker(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch is started in a callback behind the next read: an error there (a bug of ours) must still end the
    fetch loop and stop the worker with WorkerCrashed, as it did when the batch started inline, not vanish into
    the event loop's log while the worker goes on with fewer slots (and, draining, waits forever for them)."""
    app = App()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        pass

    await pg_worker.install(db_url, ["jobs"])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("SELECT pgmq.send_batch('jobs', array_fill('{}'::jsonb, ARRAY[%s]))", (JOBS,))
    hold = LeaseKeeper.hold
    held = 0

    def failing(self: LeaseKeeper, queue: QueueConfig, msg_id: int, read_ct: int, sent_at: float) -> Lease:
        nonlocal held
        held += 1
        if held == 120:  # inside the third batch, while the fourth read is on its way
            raise RuntimeError("bookkeeping bug")
        return hold(self, queue, msg_id, read_ct, sent_at)

    monkeypatch.setattr(LeaseKeeper, "hold", failing)
    with pytest.raises(pg_worker.WorkerCrashed, match="bookkeeping bug"):
        await asyncio.wait_for(pg_worker.run_worker(app, db_url, stop_when_idle=True), timeout=30)


async def test_two_workers_lose_nothing_when_reads_in_flight_are_killed(db_url: str) -> None:
    """The combined fault for the pipelined read: two workers drain one queue while a killer terminates the
    backends running a read (a read sent before its predecessor's batch started; killed before it commits or
    after, before its answer arrives). Nothing may be lost or dead-lettered, no worker may crash, and every
    job must have run; a read whose rows were leased but never returned comes back after its 2 s lease."""
    app = App()
    app.queue("jobs", visibility_timeout=2)
    ran: set[int] = set()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        ran.add(job.msg_id)

    await pg_worker.install(db_url, ["jobs"])
    observers = [RecordingObserver(), RecordingObserver()]
    killed = 0
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as killer:
        # Every read (the UPDATE that leases) takes 20 ms more: long enough to be caught while in flight.
        await killer.execute(
            "CREATE FUNCTION slow_read() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.02); RETURN NULL; END $$;"
            " CREATE TRIGGER slow_read BEFORE UPDATE ON pgmq.q_jobs FOR EACH STATEMENT EXECUTE FUNCTION slow_read()"
        )
        async with running_worker(app, db_url, observers[0], worker_id="a"), running_worker(app, db_url, observers[1], worker_id="b"):
            cur = await killer.execute("SELECT pgmq.send_batch('jobs', array_fill('{}'::jsonb, ARRAY[%s]))", (JOBS,))
            sent = {row[0] for row in await cur.fetchall()}
            deadline = time.monotonic() + 10.0  # bounded: at most 10 s and 40 terminations
            while killed < 40 and time.monotonic() < deadline and len(ran) < len(sent):
                cur = await killer.execute(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active' AND ltrim(query, E' \\n') LIKE 'WITH%%acked AS%%'"
                )
                row = await cur.fetchone()
                killed += row[0] if row else 0
                await asyncio.sleep(0.005)
            await wait_until(lambda: ran >= sent, timeout=30, what="every job run")
            await wait_until(lambda: queue_empty(db_url), timeout=30, what="every message acknowledged")
    assert killed >= 3, f"only {killed} reads were caught in flight: the fault did not happen"
    assert ran == sent
    assert await dlq_messages(db_url, "jobs") == []
    read_errors = sum(observer.db_errors.count("read") for observer in observers)
    assert read_errors >= 1, "no read failed: the terminations missed the reads"


async def queue_empty(url: str) -> bool:
    return not await queue_rows(url, "jobs")
