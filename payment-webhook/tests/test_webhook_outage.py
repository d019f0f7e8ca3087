"""The database goes away: requests answer 503 (the provider retries), nothing is half-written, and the service
takes events again once the database is back, without a restart of its own."""

from __future__ import annotations

import httpx
import psycopg
import pytest

from webhook_fixtures import make_settings
from webhook_helpers import PgServer, billing_event, events, queue, serve, standard_request


@pytest.mark.slow
def test_database_down_answers_503_then_accepts_after_restart(webhook_pg: PgServer, webhook_db: str) -> None:
    with serve(make_settings(db_timeout_seconds=1.0), webhook_db) as server:
        body, headers = standard_request(billing_event(service_id="svc-outage"), "msg_outage")
        webhook_pg.stop()
        try:
            response = httpx.post(server.base_url + "/webhooks/standard", content=body, headers=headers, timeout=30)
            assert (response.status_code, response.json()["reason"]) == (503, "database_unavailable")
            assert httpx.get(server.base_url + "/readyz", timeout=30).status_code == 503
            assert httpx.get(server.base_url + "/healthz").status_code == 200  # alive, just not ready
            assert server.metric("webhook_rejections_total", provider="standard", reason="database_unavailable") == 1
        finally:
            webhook_pg.start()
        # The provider retries the same delivery: now it is taken, once.
        retried = httpx.post(server.base_url + "/webhooks/standard", content=body, headers=headers, timeout=30)
        assert (retried.status_code, retried.json()["status"]) == (200, "accepted")
        assert httpx.get(server.base_url + "/readyz", timeout=30).status_code == 200
    with psycopg.connect(webhook_db, autocommit=True) as conn:
        assert [row[1] for row in events(conn)] == ["msg_outage"]
        assert [job["service_id"] for job in queue(conn, "device_actions")] == ["svc-outage"]
