"""Reconcile, isolated per device: an unreadable CA file, a refused login, an HTML answer and a hung router are
each reported for their device (report, metric, exit status), and the healthy router beside them is reconciled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import psycopg
import pytest

from wl_helpers import PASSWORD_REF, add_customer, add_router, drain, fast_settings
from wl_workers._store import add_device
from wl_workers.cli import main
from wl_workers.metrics import DIVERGED, RECONCILE_DEVICES
from wl_workers.reconcile import count_diverged, reconcile
from wl_workers.simulator import RouterSimulator

AL = "ip/firewall/address-list"


@pytest.fixture
def sims(router_password: str) -> Iterator[dict[str, RouterSimulator]]:
    routers = {name: RouterSimulator(username="api", password=router_password).start() for name in ("html", "login", "hung")}
    try:
        yield routers
    finally:
        for router in routers.values():
            router.stop()


async def test_one_bad_device_of_each_kind_beside_a_healthy_one(
    wl_db: str, sim: RouterSimulator, sims: dict[str, RouterSimulator], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    await add_router(wl_db, sim, "healthy")
    await add_router(wl_db, sims["html"], "html")
    await add_router(wl_db, sims["hung"], "hung")
    monkeypatch.setenv("WL_TEST_WRONG_PASSWORD", "not-it")
    await add_router(wl_db, sims["login"], "login", password_ref="env:WL_TEST_WRONG_PASSWORD")
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        await add_device(conn, name="badca", host="127.0.0.1", port=sim.port, scheme="https", ca_file="/nonexistent/ca.pem", username="api", password_ref=PASSWORD_REF)
    for i, device in enumerate(("healthy", "html", "hung", "login", "badca")):
        await add_customer(wl_db, f"c-{device}", "address-list", f"10.26.0.{i + 1}", device=device)
    sim.add(AL, list="morosos", address="10.26.0.1", comment="wl-workers: suspended")  # healthy: differs (desired active)
    sims["html"].faults.html_next = 100
    sims["hung"].faults.delay = 3.0
    failed_before = RECONCILE_DEVICES.labels("hung", "timeout")._value.get()

    settings = fast_settings(reconcile_device_budget=1.0, http_read_timeout=10.0)
    started = time.monotonic()
    report = await reconcile(wl_db, settings)
    took = time.monotonic() - started
    assert sorted(report.failed_devices) == ["badca", "html", "hung", "login"]
    assert "CA file" in report.failed_devices["badca"] and "authentication failed" in report.failed_devices["login"]
    assert "not JSON" in report.failed_devices["html"] and "budget" in report.failed_devices["hung"]
    assert [(d.service_id, d.action) for d in report.differences] == [("c-healthy", "service.activate")] and len(report.enqueued) == 1
    assert took < 4.0, f"devices are read concurrently, the hung one within its budget (took {took:.1f}s)"
    assert RECONCILE_DEVICES.labels("hung", "timeout")._value.get() == failed_before + 1
    await drain(wl_db)
    assert not sim.is_suspended_address("10.26.0.1"), "the healthy router was repaired"

    # the command's exit status and last line name the devices that were not reconciled
    sims["hung"].faults.delay = 0.0
    monkeypatch.setenv("DATABASE_URL", wl_db)
    monkeypatch.setenv("WL_RECONCILE_DEVICE_BUDGET", "2")
    assert await asyncio.to_thread(main, ["reconcile", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "devices not reconciled: badca, html, login" in err


async def test_the_diverged_gauge_counts_from_the_rows_per_device(wl_db: str, sim: RouterSimulator) -> None:
    """The alert on customers whose router differs (deploy/observability/alerts.yml, CustomersDiverged) reads
    wl_services_diverged: what reconcile saw on the router, until a job puts it right; 0 for a device in order."""
    await add_router(wl_db, sim, "r1")
    await add_router(wl_db, sim, "r2")
    await add_customer(wl_db, "c-diverged", "address-list", "10.27.0.1", device="r1")
    await add_customer(wl_db, "c-fine", "address-list", "10.27.0.2", device="r1")
    sim.add(AL, list="morosos", address="10.27.0.1", comment="wl-workers: suspended")  # desired active, router suspends
    settings = fast_settings()
    assert await count_diverged(wl_db, settings) == {"r1": 0, "r2": 0}  # nothing observed yet: nothing claimed
    await reconcile(wl_db, settings, dry_run=True)  # reads the routers, records what they show, enqueues nothing
    assert await count_diverged(wl_db, settings) == {"r1": 1, "r2": 0}
    assert DIVERGED.labels("r1")._value.get() == 1 and DIVERGED.labels("r2")._value.get() == 0
    await reconcile(wl_db, settings)
    await drain(wl_db)
    assert not sim.is_suspended_address("10.27.0.1")
    assert await count_diverged(wl_db, settings) == {"r1": 0, "r2": 0}
    assert DIVERGED.labels("r1")._value.get() == 0
