"""Level-triggered convergence under faults (issue 19): a lost lock mid-write, a busy router, head-of-line, a router
that goes down and comes back, and the data the worker records (generations, history, applied_at = verify time)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from wl_helpers import (
    add_customer,
    add_router,
    at,
    dlq,
    drain,
    enqueue,
    fast_settings,
    queue_depth,
    running_worker,
    service_row,
    wait_until,
)
from wl_workers.actions import ACTIVATE, DEACTIVATE
from wl_workers.history import list_history
from wl_workers.metrics import LOCKS_LOST
from wl_workers.simulator import RouterSimulator

AL = "ip/firewall/address-list"


@pytest.fixture
def sim2(router_password: str) -> Iterator[RouterSimulator]:
    with RouterSimulator(username="api", password=router_password) as router:
        yield router


async def queue_empty(url: str) -> bool:
    return await queue_depth(url, "device_actions") == 0


async def parked(url: str, at_least: int) -> bool:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM wl.parked_actions")
        row = await cur.fetchone()
        return row is not None and row[0] >= at_least


async def history_of(url: str, service_id: str) -> list[dict[str, object]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await list_history(conn, service_id)


async def test_lock_lost_mid_put_converges_to_the_newest_state(wl_db: str, sim: RouterSimulator) -> None:
    """The review's scenario: job A (deactivate) is mid-PUT on a slow router when its database backend is
    terminated; job B (activate, newer) runs meanwhile; A's PUT lands after B's verify. The router must end active
    without an operator, and the lost lock must show (metric, history)."""
    await add_router(wl_db, sim, max_concurrent=1)
    await add_customer(wl_db, "e1", "address-list", "10.20.0.11")
    lost_before = LOCKS_LOST.labels("r1")._value.get()
    sim.faults.method_delay["PUT"] = 1.5
    await enqueue(wl_db, DEACTIVATE, "e1", at(0), "unpaid")
    async with running_worker(wl_db, fast_settings()):
        await wait_until(lambda: sim.in_flight_by_method.get("PUT", 0) > 0, what="A's PUT in flight")
        async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as admin:
            cur = await admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'wl-workers job %%'")
            killed = await cur.fetchone()
            assert killed is not None and killed[0] == 1, "A's lock connection terminated"
        await enqueue(wl_db, ACTIVATE, "e1", at(5), "paid")
        # B converges (nothing to write), then A's PUT lands, then A's retry removes it again
        await wait_until(lambda: any(r.method == "PUT" for r in sim.requests), limit=10, what="A's late PUT")
        await wait_until(lambda: any(r.method == "DELETE" and r.status == 204 for r in sim.requests), limit=10, what="the late write undone")
        await wait_until(lambda: queue_empty(wl_db), limit=10, what="queue empty")
    assert not sim.is_suspended_address("10.20.0.11"), "the router is in the newest desired state (active)"
    svc = await service_row(wl_db, "e1")
    assert (svc.desired_state, svc.applied_state, svc.applied_generation) == ("active", "active", svc.desired_generation)
    assert LOCKS_LOST.labels("r1")._value.get() == lost_before + 1
    kinds = [(h["kind"], h["outcome"]) for h in await history_of(wl_db, "e1")]
    assert ("router_action", "lock_lost") in kinds and ("event_accepted", "accepted") in kinds
    assert await dlq(wl_db) == []


async def test_busy_router_burst_nothing_dead_lettered(wl_db: str, sim: RouterSimulator) -> None:
    """120 suspensions on one 2-slot router, two workers: every busy round is retried without using an attempt,
    so none is dead-lettered, and every final state is right; the router never sees more than 2 requests at once."""
    await add_router(wl_db, sim, max_concurrent=2)
    n = 120
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO wl.customer_services (service_id, device_id, method, target) "
            "SELECT 'b' || i, (SELECT id FROM wl.devices WHERE name = 'r1'), 'address-list', '10.21.' || (i / 250) || '.' || (i %% 250 + 1) "
            "FROM generate_series(1, %s) i",
            (n,),
        )
    sim.faults.delay = 0.01
    settings = fast_settings(action_max_attempts=3, busy_retry_delay=0.05)  # few attempts: a counted busy round would show
    for i in range(1, n + 1):
        await enqueue(wl_db, DEACTIVATE, f"b{i}", at(0))
    async with running_worker(wl_db, settings), running_worker(wl_db, settings):
        await wait_until(lambda: queue_empty(wl_db), limit=90, what="all applied")
    assert await dlq(wl_db) == []
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM wl.customer_services WHERE applied_state = 'suspended' AND applied_generation = desired_generation")
        row = await cur.fetchone()
    assert row is not None and row[0] == n
    assert len(sim.items(AL, list="morosos")) == n
    assert sim.max_in_flight <= 2


async def test_head_of_line_a_healthy_router_is_not_delayed(wl_db: str, sim: RouterSimulator, sim2: RouterSimulator) -> None:
    """120 jobs queued on a slow router (0.2 s per request, 2 slots); an activation for another router, enqueued
    behind them, is applied within 2 s."""
    await add_router(wl_db, sim, "slow", max_concurrent=2)
    await add_router(wl_db, sim2, "fast", max_concurrent=2)
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO wl.customer_services (service_id, device_id, method, target) "
            "SELECT 's' || i, (SELECT id FROM wl.devices WHERE name = 'slow'), 'address-list', '10.22.0.' || i FROM generate_series(1, 120) i"
        )
    await add_customer(wl_db, "healthy", "address-list", "10.23.0.1", device="fast")
    sim2.add(AL, list="morosos", address="10.23.0.1", comment="wl-workers: suspended")
    sim.faults.delay = 0.2
    for i in range(1, 121):
        await enqueue(wl_db, DEACTIVATE, f"s{i}", at(0))
    async with running_worker(wl_db, fast_settings(busy_retry_delay=0.5)):
        # the 120 are waiting for the slow router now (each has been seen once: the first pass is plain FIFO work)
        await wait_until(lambda: parked(wl_db, 100), limit=60, what="the slow router's jobs waiting")
        started = time.monotonic()
        await enqueue(wl_db, ACTIVATE, "healthy", at(1))
        await wait_until(lambda: not sim2.is_suspended_address("10.23.0.1"), limit=10, what="healthy router applied")
        took = time.monotonic() - started
    assert took < 2.0, f"an activation on a healthy router waited {took:.2f}s behind a busy one"


async def test_router_down_holds_jobs_and_releases_them_when_back(wl_db: str, sim: RouterSimulator) -> None:
    """The router goes down under load: jobs park (no attempt used, nothing dead-lettered) and, once it answers
    again, every pending action is applied within 1 s (plus request time: one slot per job here, so that the
    router's own throughput does not enter the measure)."""
    n = 12
    await add_router(wl_db, sim, max_concurrent=n)
    for i in range(1, n + 1):
        await add_customer(wl_db, f"d{i}", "address-list", f"10.24.0.{i}")
    settings = fast_settings(action_max_attempts=3, breaker_probe_interval=0.2, park_delay=30.0, http_connect_timeout=0.5)
    async with running_worker(wl_db, settings):
        sim.go_down()
        for i in range(1, n + 1):
            await enqueue(wl_db, DEACTIVATE, f"d{i}", at(0))
        await asyncio.sleep(2.0)  # the breaker opens and the jobs park
        async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
            cur = await conn.execute("SELECT count(*) FROM wl.parked_actions")
            row = await cur.fetchone()
        assert row is not None and row[0] >= n - 3, "the jobs wait parked, not in backoff"
        sim.come_up()
        back = time.monotonic()
        await wait_until(lambda: len(sim.items(AL, list="morosos")) == n, limit=10, what="every action applied")
        took = time.monotonic() - back
    # the request time of one action (three requests) on this machine, measured now, on the same router
    sim.reset_counters()
    probe = time.monotonic()
    await enqueue(wl_db, DEACTIVATE, "d1", at(1))
    await drain(wl_db, settings)
    request_time = time.monotonic() - probe
    assert took < 1.0 + request_time, f"the last action was applied {took:.2f}s after the router came back (one action takes {request_time:.2f}s)"
    assert await dlq(wl_db) == []
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        cur = await conn.execute("SELECT breaker_failures, last_error, last_contact_at IS NOT NULL FROM wl.devices")
        row = await cur.fetchone()
    assert row == (0, None, True)


async def test_applied_at_is_the_verify_time_and_history_records_the_story(wl_db: str, sim: RouterSimulator) -> None:
    await add_router(wl_db, sim)
    await add_customer(wl_db, "h1", "address-list", "10.25.0.1")
    sim.faults.delay = 0.3
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        from pg_worker import AsyncProducer
        from wl_workers.actions import action_message
        from wl_workers.settings import DEVICE_ACTIONS

        async with AsyncProducer(wl_db) as producer:
            await producer.enqueue(DEVICE_ACTIONS, action_message(DEACTIVATE, "h1", at(0), "unpaid", source="webhook", actor="mercadopago", event_id="ev-1", payment_id="p-9"))
        started = datetime.now(UTC)
        async with running_worker(wl_db, fast_settings()):
            await wait_until(lambda: service_row(wl_db, "h1"), what="row")
            await wait_until(lambda: queue_empty(wl_db), what="done")
        row = await service_row(wl_db, "h1")
        assert row.applied_at is not None and (row.applied_at - started).total_seconds() >= 0.6, "after the writes and the verify, not at the job's start"
        history = await list_history(conn, "h1")
    story = [(h["kind"], h["source"], h["actor"], h["event_id"], h["payment_id"], h["outcome"]) for h in reversed(history)]
    assert story == [
        ("event_accepted", "webhook", "mercadopago", "ev-1", "p-9", "accepted"),
        ("desired_changed", "webhook", "mercadopago", "ev-1", "p-9", None),
        ("router_action", "webhook", "mercadopago", "ev-1", "p-9", "applied"),
    ]
