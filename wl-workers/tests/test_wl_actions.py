"""device_actions jobs end to end: a real worker, a real database, the simulator over HTTP."""

from __future__ import annotations

import pytest

from wl_helpers import (
    PASSWORD_REF,
    add_customer,
    add_router,
    at,
    changes,
    dlq,
    drain,
    enqueue,
    fast_settings,
    queue_depth,
    queue_dlq_count,
    running_worker,
    service_row,
    wait_until,
)
from wl_workers.actions import ACTIVATE, DEACTIVATE
from wl_workers.metrics import ACTIONS, FAILURES
from wl_workers.simulator import RouterSimulator

AL = "ip/firewall/address-list"


async def customers(url: str, sim: RouterSimulator) -> None:
    await add_router(url, sim)
    await add_customer(url, "c-al", "address-list", "10.20.0.11")
    await add_customer(url, "c-ppp", "pppoe", "pppoe-1")
    sim.add("ppp/secret", name="pppoe-1", service="pppoe")
    sim.add("ppp/active", name="pppoe-1", address="10.30.0.1")


async def test_deactivate_then_activate_both_methods(wl_db: str, sim: RouterSimulator) -> None:
    await customers(wl_db, sim)
    before = (sim.items(AL), sim.items("ppp/secret"))
    for service in ("c-al", "c-ppp"):
        await enqueue(wl_db, DEACTIVATE, service, at(0), "unpaid")
    await drain(wl_db)
    assert sim.is_suspended_address("10.20.0.11")
    assert sim.items("ppp/secret", name="pppoe-1")[0]["disabled"] == "true"
    assert not sim.items("ppp/active", name="pppoe-1")
    row = await service_row(wl_db, "c-al")
    assert (row.desired_state, row.applied_state, row.applied_event_at, row.last_error) == ("suspended", "suspended", at(0), None)

    for service in ("c-al", "c-ppp"):
        await enqueue(wl_db, ACTIVATE, service, at(5), "paid")
    await drain(wl_db)
    ids_free = [[{k: v for k, v in i.items() if k != ".id"} for i in items] for items in (sim.items(AL), sim.items("ppp/secret"))]
    assert ids_free == [[{k: v for k, v in i.items() if k != ".id"} for i in items] for items in before], "restored exactly"
    row = await service_row(wl_db, "c-ppp")
    assert (row.applied_state, row.applied_event_at) == ("active", at(5))
    assert await queue_depth(wl_db, "device_actions") == 0


async def test_twice_equals_once(wl_db: str, sim: RouterSimulator) -> None:
    await customers(wl_db, sim)
    await enqueue(wl_db, DEACTIVATE, "c-al", at(0))
    await drain(wl_db)
    sim.reset_counters()
    await enqueue(wl_db, DEACTIVATE, "c-al", at(0))
    await drain(wl_db)
    assert changes(sim) == []
    assert len(sim.items(AL, address="10.20.0.11")) == 1


async def test_out_of_order_events_newest_wins(wl_db: str, sim: RouterSimulator) -> None:
    await customers(wl_db, sim)
    applied_before = ACTIONS.labels("r1", DEACTIVATE, "stale")._value.get()
    await enqueue(wl_db, ACTIVATE, "c-al", at(10), "payment")  # the newer event arrives first
    await drain(wl_db)
    await enqueue(wl_db, DEACTIVATE, "c-al", at(5), "late suspension")
    await drain(wl_db)
    assert not sim.is_suspended_address("10.20.0.11"), "a stale suspension must not undo a newer payment"
    row = await service_row(wl_db, "c-al")
    assert (row.desired_state, row.applied_state, row.applied_event_at) == ("active", "active", at(10))
    assert ACTIONS.labels("r1", DEACTIVATE, "stale")._value.get() == applied_before + 1


async def test_device_down_retries_then_succeeds(wl_db: str, sim: RouterSimulator) -> None:
    await customers(wl_db, sim)
    failures_before = FAILURES.labels("r1", "transient")._value.get()
    sim.go_down()
    await enqueue(wl_db, DEACTIVATE, "c-ppp", at(0))
    async with running_worker(wl_db, fast_settings(action_max_attempts=50)):
        await wait_until(lambda: FAILURES.labels("r1", "transient")._value.get() >= failures_before + 2, what="two failed attempts")
        row = await service_row(wl_db, "c-ppp")
        assert row.last_error and row.last_error.startswith("transient: connection failed")
        assert row.applied_state is None
        sim.come_up()

        async def applied() -> bool:
            return (await service_row(wl_db, "c-ppp")).applied_state == "suspended"

        await wait_until(applied, what="suspension applied after the device came back")
    assert sim.items("ppp/secret", name="pppoe-1")[0]["disabled"] == "true"
    assert (await service_row(wl_db, "c-ppp")).last_error is None
    assert await dlq(wl_db) == []


async def test_bad_credentials_dead_letter_at_once(wl_db: str, sim: RouterSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    await customers(wl_db, sim)
    monkeypatch.setenv("WL_TEST_ROUTER_PASSWORD", "not-the-password")
    await enqueue(wl_db, DEACTIVATE, "c-al", at(0))
    await drain(wl_db)
    dead = await dlq(wl_db)
    assert len(dead) == 1 and dead[0]["attempts"] == 1
    assert "authentication failed" in str(dead[0]["error"])
    row = await service_row(wl_db, "c-al")
    assert row.last_error is not None and row.last_error.startswith("permanent: authentication failed")
    assert "not-the-password" not in row.last_error
    assert not sim.is_suspended_address("10.20.0.11")


async def test_unknown_service_and_bad_payload_dead_letter(wl_db: str, sim: RouterSimulator) -> None:
    await customers(wl_db, sim)
    await enqueue(wl_db, ACTIVATE, "no-such-service", at(0))
    await drain(wl_db)
    assert await queue_dlq_count(wl_db) == 1
    dead = await dlq(wl_db)
    assert "no customer service" in str(dead[0]["error"])


async def test_password_reference_unresolvable_is_permanent(wl_db: str, sim: RouterSimulator) -> None:
    await add_router(wl_db, sim, password_ref="env:WL_TEST_UNSET_VARIABLE")
    await add_customer(wl_db, "c1", "address-list", "10.0.0.1")
    await enqueue(wl_db, DEACTIVATE, "c1", at(0))
    await drain(wl_db)
    row = await service_row(wl_db, "c1")
    assert row.last_error is not None and "WL_TEST_UNSET_VARIABLE is not set" in row.last_error
    assert len(await dlq(wl_db)) == 1


async def test_binary_api_device_end_to_end(wl_db: str, sim: RouterSimulator) -> None:
    import psycopg

    from wl_workers._store import add_device

    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        await add_device(conn, name="v6", driver="routeros-api", host="127.0.0.1", port=sim.api_port, scheme="http", username=sim.username, password_ref=PASSWORD_REF)
    await add_customer(wl_db, "c-v6", "pppoe", "pppoe-6", device="v6")
    sim.add("ppp/secret", name="pppoe-6")
    sim.add("ppp/active", name="pppoe-6")
    await enqueue(wl_db, DEACTIVATE, "c-v6", at(0))
    await drain(wl_db)
    assert sim.items("ppp/secret", name="pppoe-6")[0]["disabled"] == "true" and not sim.items("ppp/active")
    await enqueue(wl_db, ACTIVATE, "c-v6", at(1))
    await drain(wl_db)
    assert sim.items("ppp/secret", name="pppoe-6")[0]["disabled"] == "false"
    assert all(r.path.startswith("api:") for r in sim.requests)
    assert (await service_row(wl_db, "c-v6")).applied_state == "active"
