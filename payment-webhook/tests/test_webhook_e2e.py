"""The whole flow: a signed provider event in over HTTP -> its job in the queue -> a wl-workers worker -> the
customer's address leaves (or joins) the suspended address-list on the simulated router.

Everything is real except the router (wl-workers' RouterOS REST simulator on 127.0.0.1) and the Mercado Pago API
(a fake on 127.0.0.1): uvicorn serving the webhook app, PostgreSQL 18 with pgmq, the pg-worker Worker running
wl-workers' handlers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import pytest

from pg_worker import Worker, WorkerConfig
from webhook_fixtures import make_settings
from webhook_helpers import billing_event, events, mp_request, queue, serve, standard_request
from wl_workers._migrate import migrate as wl_migrate
from wl_workers._store import add_device, add_service
from wl_workers.app import build_app
from wl_workers.settings import WlSettings
from wl_workers.simulator import RouterSimulator

ROUTER_PASSWORD_ENV = "WEBHOOK_E2E_ROUTER_PASSWORD"
MP_TOKEN = "APP_USR-e2e-test-token"
CUSTOMER_IP = "10.20.0.11"


@pytest.fixture
async def flow_db(webhook_db: str) -> str:
    """The webhook's database, also migrated by wl-workers (one database, as in production)."""
    await wl_migrate(webhook_db)
    return webhook_db


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> Iterator[RouterSimulator]:
    monkeypatch.setenv(ROUTER_PASSWORD_ENV, "e2e-router-password")
    with RouterSimulator(username="api", password="e2e-router-password") as sim:
        yield sim


async def _customer(url: str, sim: RouterSimulator, service_id: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await add_device(conn, name="r1", host="127.0.0.1", port=sim.port, scheme="http", username=sim.username,
                         password_ref=f"env:{ROUTER_PASSWORD_ENV}")
        await add_service(conn, service_id, "r1", "address-list", CUSTOMER_IP)


def _worker_settings() -> WlSettings:
    # Read at call time: the Mercado Pago test sets MERCADOPAGO_API_BASE_URL/ACCESS_TOKEN first.
    fast: dict[str, Any] = {"action_base_delay": 0.1, "action_max_delay": 0.5, "busy_retry_delay": 0.1, "http_read_timeout": 2.0,
                            "http_connect_timeout": 1.0, "lock_wait": 5.0, "payment_base_delay": 0.1}
    return WlSettings(**fast)


async def _drain(url: str) -> None:
    """A wl-workers worker processes everything due now, then stops."""
    worker = Worker(build_app(url, _worker_settings()), url, WorkerConfig(listen=False, worker_id=f"e2e-{time.monotonic_ns()}"))
    await worker.run(stop_when_idle=True)


def _billing(event_type: str, service_id: str, at: datetime, msg_id: str) -> tuple[bytes, dict[str, str]]:
    event = billing_event(event_type, service_id)
    event["timestamp"] = at.isoformat()
    return standard_request(event, msg_id)


async def test_signed_payment_approved_restores_the_customer_on_the_router(flow_db: str, router: RouterSimulator) -> None:
    await _customer(flow_db, router, "svc-1001")
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    with serve(make_settings(), flow_db) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            # Billing suspends the customer: the address joins the suspended list.
            body, headers = _billing("service.suspend", "svc-1001", t0, "msg_suspend")
            assert (await client.post("/webhooks/standard", content=body, headers=headers)).status_code == 200
            await _drain(flow_db)
            assert router.is_suspended_address(CUSTOMER_IP)

            # The customer pays: a signed payment.approved, later than the suspension.
            body, headers = _billing("payment.approved", "svc-1001", t0 + timedelta(minutes=5), "msg_paid")
            response = await client.post("/webhooks/standard", content=body, headers=headers)
            assert response.json() == {"status": "accepted", "event_id": "msg_paid"}
            with psycopg.connect(flow_db) as conn:
                [job] = queue(conn, "device_actions")
            assert (job["type"], job["service_id"]) == ("service.activate", "svc-1001")
            await _drain(flow_db)
            assert not router.is_suspended_address(CUSTOMER_IP), "the payment must switch the service back on"

            # The billing system retries the payment: a duplicate, nothing new to do.
            again = await client.post("/webhooks/standard", content=body, headers=headers)
            assert again.json()["status"] == "duplicate"
    with psycopg.connect(flow_db) as conn:
        assert [row[1] for row in events(conn)] == ["msg_suspend", "msg_paid"]
        assert queue(conn, "device_actions") == []
        state = conn.execute("SELECT desired_state, applied_state FROM wl.customer_services WHERE service_id = 'svc-1001'").fetchone()
    assert state == ("active", "active")


class FakeMercadoPagoApi:
    """GET /v1/payments/{id} on 127.0.0.1, answering the payments it was given."""

    def __init__(self, payments: dict[str, dict[str, Any]]) -> None:
        self.payments = payments

        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                payment_id = self.path.rsplit("/", 1)[-1]
                if self.headers.get("Authorization") != f"Bearer {MP_TOKEN}":
                    status, payload = 401, {"message": "invalid_token"}
                elif self.path.startswith("/v1/payments/") and payment_id in fake.payments:
                    status, payload = 200, fake.payments[payment_id]
                else:
                    status, payload = 404, {"message": "Payment not found"}
                data = json.dumps(payload).encode()
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


async def test_signed_mercadopago_notification_restores_the_customer(
    flow_db: str, router: RouterSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _customer(flow_db, router, "svc-2002")
    router.add("ip/firewall/address-list", list="morosos", address=CUSTOMER_IP, comment="wl-workers: suspended")  # ours: activate removes only our entries
    assert router.is_suspended_address(CUSTOMER_IP)
    approved = {"id": 987654321, "status": "approved", "external_reference": "svc-2002", "date_approved": datetime.now(UTC).isoformat()}
    api = FakeMercadoPagoApi({"987654321": approved})
    api.thread.start()
    monkeypatch.setenv("MERCADOPAGO_API_BASE_URL", api.url)
    monkeypatch.setenv("MERCADOPAGO_ACCESS_TOKEN", MP_TOKEN)
    try:
        with serve(make_settings(), flow_db) as server:
            query, body, headers = mp_request("987654321", "mp-notification-1")
            async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
                response = await client.post("/webhooks/mercadopago" + query, content=body, headers=headers)
            assert response.json()["status"] == "accepted"
        # payments.sync fetches the payment and enqueues service.activate; the next round applies it.
        await _drain(flow_db)
        await _drain(flow_db)
        assert not router.is_suspended_address(CUSTOMER_IP)
    finally:
        api.server.shutdown()
        api.server.server_close()
