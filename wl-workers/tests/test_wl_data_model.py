"""The data model other parts read (CONTRACT.md): record_desired and generations, service history, service.refresh,
device.test, wl.service_exists, and history rows of a dead letter."""

from __future__ import annotations

import psycopg
import pytest

from pg_worker import AsyncProducer
from wl_helpers import add_customer, add_router, at, drain, enqueue, service_row
from wl_workers._store import NotFound
from wl_workers.actions import DEACTIVATE
from wl_workers.desired import record_desired
from wl_workers.history import list_history, prune, record
from wl_workers.settings import DEVICE_ACTIONS
from wl_workers.simulator import RouterSimulator


async def test_record_desired_generations_and_stale_events(wl_db: str, sim: RouterSimulator) -> None:
    await add_router(wl_db, sim)
    await add_customer(wl_db, "g1", "address-list", "10.27.0.1")
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        common = {"source": "operator", "actor": "ana", "reason": "test"}
        first = await record_desired(conn, "g1", "suspended", event_at=at(5), **common)
        assert (first.accepted, first.generation, first.changed) == (True, 2, True)
        same = await record_desired(conn, "g1", "suspended", event_at=at(6), **common)
        assert (same.accepted, same.generation, same.changed) == (True, 2, False), "no change, no new generation"
        stale = await record_desired(conn, "g1", "active", event_at=at(1), **common)
        assert (stale.accepted, stale.generation) == (False, 2)
        with pytest.raises(NotFound):
            await record_desired(conn, "nope", "active", event_at=at(1), **common)
        cur = await conn.execute("SELECT desired_state, desired_reason, desired_source, desired_actor, desired_changed_at IS NOT NULL FROM wl.customer_services WHERE service_id = 'g1'")
        assert await cur.fetchone() == ("suspended", "test", "operator", "ana", True)
        kinds = [h["kind"] for h in await list_history(conn, "g1")]
        assert kinds == ["event_stale", "event_accepted", "desired_changed", "event_accepted"]
        page = await list_history(conn, "g1", limit=2)
        older = await list_history(conn, "g1", limit=10, before_id=page[-1]["id"])
        assert [h["kind"] for h in older] == ["desired_changed", "event_accepted"]
        await record(conn, "g1", "operator", actor="ana", reason="note")
        await conn.execute("UPDATE wl.service_history SET at = at - interval '500 days' WHERE kind = 'operator'")
        assert await prune(conn, 400) == 1
        cur = await conn.execute("SELECT wl.service_exists('g1'), wl.service_exists('nope')")
        assert await cur.fetchone() == (True, False)


async def test_refresh_and_device_test_jobs(wl_db: str, sim: RouterSimulator) -> None:
    await add_router(wl_db, sim)
    await add_customer(wl_db, "r1c", "address-list", "10.27.0.2")
    sim.add("ip/firewall/address-list", list="morosos", address="10.27.0.2", comment="wl-workers: suspended")
    async with AsyncProducer(wl_db) as producer:
        await producer.enqueue(DEVICE_ACTIONS, {"type": "service.refresh", "service_id": "r1c", "source": "console", "actor": "ana"})
        await producer.enqueue(DEVICE_ACTIONS, {"type": "device.test", "device": "r1", "source": "console", "actor": "ana", "request_id": "t-1"})
        await producer.enqueue(DEVICE_ACTIONS, {"type": "device.test", "device": "ghost", "request_id": "t-2"})
    await drain(wl_db)
    row = await service_row(wl_db, "r1c")
    assert row.observed_state == "suspended" and row.observed_at is not None
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        history = await list_history(conn, "r1c")
        assert [(h["kind"], h["source"], h["actor"]) for h in history] == [("router_read", "console", "ana")]
        cur = await conn.execute("SELECT request_id, device, ok, message FROM wl.device_tests ORDER BY request_id")
        tests = await cur.fetchall()
        assert tests[0][:3] == ("t-1", "r1", True) and "logged in as api" in tests[0][3]
        assert tests[1][:3] == ("t-2", "ghost", False)
        cur = await conn.execute("SELECT last_contact_at IS NOT NULL, last_error FROM wl.devices WHERE name = 'r1'")
        assert await cur.fetchone() == (True, None)


async def test_device_test_records_a_refused_login(wl_db: str, sim: RouterSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WL_TEST_BAD_PW", "wrong")
    await add_router(wl_db, sim, password_ref="env:WL_TEST_BAD_PW")
    async with AsyncProducer(wl_db) as producer:
        await producer.enqueue(DEVICE_ACTIONS, {"type": "device.test", "device": "r1", "request_id": "t-3"})
    await drain(wl_db)
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        cur = await conn.execute("SELECT ok, message FROM wl.device_tests")
        ok, message = (await cur.fetchall())[0]
        assert not ok and "authentication failed" in message
        cur = await conn.execute("SELECT last_error FROM wl.devices")
        row = await cur.fetchone()
        assert row is not None and "authentication failed" in row[0]


async def test_dead_letter_is_in_the_history(wl_db: str, sim: RouterSimulator) -> None:
    await add_router(wl_db, sim)
    await add_customer(wl_db, "p1", "pppoe", "no-such-secret")
    await enqueue(wl_db, DEACTIVATE, "p1", at(0))
    await drain(wl_db)
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        history = await list_history(conn, "p1")
    assert [(h["kind"], h["outcome"]) for h in history][:2] == [("dead_letter", "dead_letter"), ("router_action", "error")]
    assert history[0]["error_class"] == "permanent" and "no PPP secret" in str(history[0]["reason"])
