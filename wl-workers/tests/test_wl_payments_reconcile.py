"""payments.sync against a fake Mercado Pago API on 127.0.0.1, and reconcile against the simulator."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

from pg_worker import AsyncProducer
from wl_helpers import (
    add_customer,
    add_router,
    at,
    dlq,
    drain,
    enqueue,
    fast_settings,
    queue_depth,
    service_row,
    wait_until,
)
from wl_workers.actions import DEACTIVATE
from wl_workers.reconcile import reconcile, reconcile_once_exclusive
from wl_workers.settings import PAYMENT_SYNC
from wl_workers.simulator import RouterSimulator

TOKEN = "APP_USR-test-token"


class FakeMercadoPago:
    def __init__(self) -> None:
        self.payments: dict[str, dict[str, Any]] = {}
        self.fail_next = 0
        self.seen_auth: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.seen_auth.append(self.headers.get("Authorization", ""))
                payment_id = self.path.rsplit("/", 1)[-1]
                if fake.fail_next:
                    fake.fail_next -= 1
                    status, body = 502, {"message": "bad gateway"}
                elif self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    status, body = 401, {"message": "invalid_token"}
                elif not self.path.startswith("/v1/payments/") or payment_id not in fake.payments:
                    status, body = 404, {"message": "Payment not found"}
                else:
                    status, body = 200, fake.payments[payment_id]
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def mercadopago(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeMercadoPago]:
    fake = FakeMercadoPago()
    fake.thread.start()
    monkeypatch.setenv("MERCADOPAGO_API_BASE_URL", fake.url)
    monkeypatch.setenv("MERCADOPAGO_ACCESS_TOKEN", TOKEN)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


async def sync(url: str, payment_id: str) -> None:
    async with AsyncProducer(url) as producer:
        await producer.enqueue(PAYMENT_SYNC, {"type": "payments.sync", "provider": "mercadopago", "payment_id": payment_id, "notified_at": at(0).isoformat()})


async def test_approved_payment_activates_the_service(wl_db: str, sim: RouterSimulator, mercadopago: FakeMercadoPago) -> None:
    await add_router(wl_db, sim)
    await add_customer(wl_db, "c-al", "address-list", "10.20.0.11")
    await enqueue(wl_db, DEACTIVATE, "c-al", at(0), "unpaid")
    await drain(wl_db)
    assert sim.is_suspended_address("10.20.0.11")
    mercadopago.payments["123"] = {"id": 123, "status": "approved", "external_reference": "c-al", "date_approved": "2026-11-01T08:30:00.000-04:00"}
    mercadopago.payments["124"] = {"id": 124, "status": "pending", "external_reference": "c-al", "date_approved": None}
    mercadopago.payments["125"] = {"id": 125, "status": "approved", "external_reference": "someone-else", "date_approved": "2026-11-01T08:30:00.000-04:00"}
    mercadopago.fail_next = 1  # the first fetch fails transiently: retried
    for payment in ("124", "125", "123"):
        await sync(wl_db, payment)
    await drain(wl_db, fast_settings())

    async def settled() -> bool:
        await drain(wl_db, fast_settings())
        return await queue_depth(wl_db, PAYMENT_SYNC) == 0 and await queue_depth(wl_db, "device_actions") == 0

    await wait_until(settled, what="payment synced and activation applied")
    assert not sim.is_suspended_address("10.20.0.11")
    row = await service_row(wl_db, "c-al")
    assert (row.applied_state, row.applied_event_at) == ("active", datetime(2026, 11, 1, 12, 30, tzinfo=UTC)), "event_at = date_approved"
    assert set(mercadopago.seen_auth) == {f"Bearer {TOKEN}"}
    assert await dlq(wl_db, PAYMENT_SYNC) == []


async def test_payment_sync_bad_token_and_unknown_payment_dead_letter(wl_db: str, mercadopago: FakeMercadoPago, monkeypatch: pytest.MonkeyPatch) -> None:
    await sync(wl_db, "999")
    await drain(wl_db)
    monkeypatch.setenv("MERCADOPAGO_ACCESS_TOKEN", "wrong")
    mercadopago.payments["1"] = {"id": 1, "status": "approved", "external_reference": "x", "date_approved": "2026-11-01T08:30:00Z"}
    await sync(wl_db, "1")
    await drain(wl_db, fast_settings())
    errors = [str(d["error"]) for d in await dlq(wl_db, PAYMENT_SYNC)]
    assert len(errors) == 2
    assert "no payment 999" in errors[0] and "refused the access token" in errors[1]
    assert "wrong" not in errors[1]


async def test_reconcile_repairs_a_router_changed_by_hand(wl_db: str, sim: RouterSimulator) -> None:
    await add_router(wl_db, sim)
    await add_customer(wl_db, "c-al", "address-list", "10.20.0.11")
    await add_customer(wl_db, "c-ppp", "pppoe", "pppoe-1")
    await add_customer(wl_db, "c-ok", "address-list", "10.20.0.12")
    sim.add("ppp/secret", name="pppoe-1")
    await enqueue(wl_db, DEACTIVATE, "c-ppp", at(0))
    await drain(wl_db)
    # by hand: someone restores an old backup that still lists c-al (our entry) and re-enables c-ppp's secret
    sim.add("ip/firewall/address-list", list="morosos", address="10.20.0.11", comment="wl-workers: suspended")
    sim.set_where("ppp/secret", {"name": "pppoe-1"}, disabled="false")

    dry = await reconcile(wl_db, fast_settings(), dry_run=True)
    assert sorted((d.service_id, d.action) for d in dry.differences) == [("c-al", "service.activate"), ("c-ppp", "service.deactivate")]
    assert dry.checked == 3 and dry.enqueued == [] and await queue_depth(wl_db, "device_actions") == 0

    report = await reconcile_once_exclusive(wl_db, fast_settings())
    assert report is not None and len(report.enqueued) == 2
    await drain(wl_db)
    assert not sim.is_suspended_address("10.20.0.11")
    assert sim.items("ppp/secret", name="pppoe-1")[0]["disabled"] == "true"
    again = await reconcile(wl_db, fast_settings(), dry_run=True)
    assert again.differences == [] and again.errors == []


async def test_reconcile_reports_an_unreachable_device(wl_db: str, sim: RouterSimulator) -> None:
    await add_router(wl_db, sim)
    await add_customer(wl_db, "c-al", "address-list", "10.20.0.11")
    sim.go_down()
    report = await reconcile(wl_db, fast_settings(http_connect_timeout=0.5), dry_run=True)
    assert report.differences == [] and len(report.errors) == 1 and report.errors[0][0] == "r1"
    assert list(report.failed_devices) == ["r1"]


async def test_periodic_reconcile_repairs_the_router(wl_db: str, sim: RouterSimulator) -> None:
    from wl_workers.runner import _periodic_reconcile

    await add_router(wl_db, sim)
    await add_customer(wl_db, "c-al", "address-list", "10.20.0.11")
    sim.add("ip/firewall/address-list", list="morosos", address="10.20.0.11", comment="wl-workers: suspended")  # a backup restored
    stop = asyncio.Event()
    settings = fast_settings(reconcile_interval=0.2)
    # two workers' periodic reconcilers, as with two processes
    tasks = [asyncio.create_task(_periodic_reconcile(wl_db, settings, stop)) for _ in range(2)]
    try:
        await wait_until(lambda: queue_depth(wl_db, "device_actions"), what="a repair enqueued by the periodic reconcile")
        await drain(wl_db)
        await wait_until(lambda: not sim.is_suspended_address("10.20.0.11"), what="router repaired")
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_one_reconcile_pass_at_a_time(wl_db: str, sim: RouterSimulator) -> None:
    from wl_workers import _sql

    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as other:
        await other.execute(_sql.TRY_RECONCILE_LOCK)  # another process is reconciling
        assert await reconcile_once_exclusive(wl_db, fast_settings()) is None
        await other.execute(_sql.RELEASE_RECONCILE_LOCK)
    assert await reconcile_once_exclusive(wl_db, fast_settings()) is not None
