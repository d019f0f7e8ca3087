"""What the operator sees and runs: unknown services, retention, settings that never show a secret, /metrics
on a port of its own, and ``serve`` refusing weak secrets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from payment_webhook import create_app
from webhook_fixtures import make_settings
from webhook_helpers import RunningServer, billing_event, event_rows, queue, serve, serve_process, standard_request

Conn = psycopg.Connection[tuple[Any, ...]]
ROOT = Path(__file__).resolve().parents[2]

# What wl-workers' migration 0003 provides (CONTRACT.md); the webhook must not need wl-workers' code for it.
SERVICE_EXISTS = """
CREATE SCHEMA IF NOT EXISTS wl;
CREATE FUNCTION wl.service_exists(text) RETURNS boolean LANGUAGE sql STABLE SECURITY DEFINER
AS $$ SELECT $1 = ANY (ARRAY['svc-known']) $$;
"""


def _post(server: RunningServer, event: dict[str, Any], msg_id: str) -> httpx.Response:
    body, headers = standard_request(event, msg_id)
    return httpx.post(server.base_url + "/webhooks/standard", content=body, headers=headers, timeout=10)


def _cli(*args: str, db_url: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_")} | {"DATABASE_URL": db_url} | (env or {})
    return subprocess.run([sys.executable, "-m", "payment_webhook", *args], env=full_env, capture_output=True, text=True, timeout=60)


def test_an_event_for_an_unknown_service_is_stored_answered_2xx_counted_and_listed_without_a_job(webhook_db: str, db: Conn) -> None:
    db.execute(SERVICE_EXISTS)
    with serve(make_settings(), webhook_db) as server:
        assert 'outcome="unknown_service",provider="standard",type="payment.approved"} 0.0' in httpx.get(server.base_url + "/metrics").text
        assert _post(server, billing_event(service_id="svc-known"), "msg_known").json()["status"] == "accepted"
        response = _post(server, billing_event(service_id="svc-gone", payment_id="pay-lost"), "msg_gone")
        # 2xx: the billing system must not retry for ever what no retry can fix; an operator must look at it.
        assert (response.status_code, response.json()["status"]) == (200, "unknown_service")
        again = _post(server, billing_event(service_id="svc-gone", payment_id="pay-lost"), "msg_gone")
        assert again.json()["status"] == "duplicate"
        assert server.metric("webhook_events_total", provider="standard", type="payment.approved", outcome="unknown_service") == 1
    assert [job["service_id"] for job in queue(db, "device_actions")] == ["svc-known"]
    rows = {r["event_id"]: r for r in event_rows(db)}
    assert (rows["msg_gone"]["outcome"], rows["msg_gone"]["service_id"], rows["msg_gone"]["msg_id"]) == ("unknown_service", "svc-gone", None)
    assert rows["msg_known"]["outcome"] == "accepted"
    listed = _cli("events", "--outcome", "unknown_service", "--json", db_url=webhook_db)
    assert listed.returncode == 0, listed.stderr
    [entry] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (entry["event_id"], entry["service_id"], entry["payment_id"], entry["amount"], entry["currency"]) == (
        "msg_gone", "svc-gone", "pay-lost", "1500.00", "ARS")
    table = _cli("events", "--outcome", "unknown_service", db_url=webhook_db)
    assert "svc-gone" in table.stdout and "svc-known" not in table.stdout


def test_without_the_function_every_service_counts_as_existing_until_it_appears(webhook_server: RunningServer, db: Conn) -> None:
    assert _post(webhook_server, billing_event(service_id="svc-anything"), "msg_any").json()["status"] == "accepted"
    assert len(queue(db, "device_actions")) == 1
    # wl-workers migrates while the webhook runs: the next event is checked, without a restart.
    db.execute(SERVICE_EXISTS)
    assert _post(webhook_server, billing_event(service_id="svc-anything"), "msg_any_2").json()["status"] == "unknown_service"
    assert len(queue(db, "device_actions")) == 1


def _insert_aged(conn: Conn, event_id: str, days: int) -> None:
    conn.execute(
        "INSERT INTO webhook.events (provider, event_id, type, payload, received_at, outcome) "
        "VALUES ('standard', %s, 'payment.approved', '{}', now() - make_interval(days => %s), 'accepted')",
        (event_id, days),
    )


def test_the_serve_process_prunes_events_older_than_the_retention_age(webhook_db: str, db: Conn) -> None:
    _insert_aged(db, "old", 401)
    _insert_aged(db, "recent", 399)
    with serve(make_settings(prune_interval_seconds=0.2), webhook_db) as server:
        deadline = time.monotonic() + 20
        while [r["event_id"] for r in event_rows(db)] != ["recent"]:
            assert time.monotonic() < deadline, "the old event was not pruned"
            time.sleep(0.1)
        assert server.metric("webhook_events_pruned_total") == 1
        _insert_aged(db, "old-2", 500)  # the next round takes it too
        while [r["event_id"] for r in event_rows(db)] != ["recent"]:
            assert time.monotonic() < deadline, "the second old event was not pruned"
            time.sleep(0.1)


def test_the_prune_command(webhook_db: str, db: Conn) -> None:
    _insert_aged(db, "a", 40)
    _insert_aged(db, "b", 10)
    result = _cli("prune", "--older-than-days", "30", db_url=webhook_db)
    assert result.returncode == 0, result.stderr
    assert "deleted 1 events" in result.stdout
    assert [r["event_id"] for r in event_rows(db)] == ["b"]


def test_reprs_of_settings_and_app_state_never_show_the_database_password() -> None:
    url = "postgresql://webhook:pw-Zq81-secret@127.0.0.1:1/widelink"
    settings = make_settings(database_url=url)
    app = create_app(settings)
    for shown in (repr(settings), str(settings), repr(app.state.service), repr(vars(app.state))):
        assert "pw-Zq81-secret" not in shown
        assert "MfKQ9r8" not in shown  # the Standard secret of the tests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_metrics_on_a_port_of_their_own(webhook_db: str) -> None:
    port = _free_port()
    with serve_process(webhook_db, {"WEBHOOK_METRICS_PORT": str(port)}) as (base_url, _proc):
        assert httpx.get(base_url + "/metrics", timeout=10).status_code == 404
        body, headers = standard_request(billing_event(), "msg_metrics")
        assert httpx.post(base_url + "/webhooks/standard", content=body, headers=headers, timeout=10).status_code == 200
        deadline = time.monotonic() + 20
        while True:
            try:
                metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert 'webhook_events_total{outcome="accepted",provider="standard",type="payment.approved"} 1.0' in metrics.text
        assert httpx.post(f"http://127.0.0.1:{port}/webhooks/standard", content=body, headers=headers, timeout=10).status_code in (404, 405)


@pytest.mark.parametrize(
    ("env", "variable", "value"),
    [
        ({"WEBHOOK_STANDARD_SECRETS": "whsec_change-me"}, "WEBHOOK_STANDARD_SECRETS", "change-me"),
        ({"WEBHOOK_MERCADOPAGO_SECRETS": "change-me"}, "WEBHOOK_MERCADOPAGO_SECRETS", "change-me"),
        ({"WEBHOOK_STANDARD_SECRETS": "whsec_AA"}, "WEBHOOK_STANDARD_SECRETS", "whsec_AA"),
    ],
)
def test_serve_refuses_weak_secrets_naming_the_variable_never_the_value(
    webhook_db: str, env: dict[str, str], variable: str, value: str
) -> None:
    result = _cli("serve", "--port", "0", db_url=webhook_db, env=env)
    assert result.returncode != 0
    [line] = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert line.startswith("payment-webhook: bad settings:") and variable in line
    assert value not in line


def test_serve_refuses_to_start_from_the_example_env_file(webhook_db: str) -> None:
    env = {}
    for line in (ROOT / "deploy" / "env" / "payment-webhook.env.example").read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#") and name.startswith("WEBHOOK_"):
            env[name] = value
    result = _cli("serve", "--port", "0", db_url=webhook_db, env=env)
    assert result.returncode != 0
    assert "payment-webhook:" in result.stderr
