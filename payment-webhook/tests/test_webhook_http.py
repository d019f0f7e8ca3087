"""The webhook endpoints through real HTTP (uvicorn on 127.0.0.1) against a real PostgreSQL 18."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from datetime import datetime
from typing import Any

import httpx
import psycopg
import pytest

from pg_worker import AsyncProducer
from webhook_fixtures import make_settings
from webhook_helpers import (
    EVENT_AT,
    MP_SECRETS,
    RunningServer,
    billing_event,
    events,
    mp_request,
    queue,
    serve,
    standard_request,
)

Conn = psycopg.Connection[tuple[Any, ...]]


def post(server: RunningServer, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.base_url + path, content=body, headers=headers, timeout=10)


def test_payment_approved_is_stored_once_and_enqueues_service_activate(webhook_server: RunningServer, db: Conn) -> None:
    body, headers = standard_request(billing_event("payment.approved", "svc-42"), "msg_a")
    response = post(webhook_server, "/webhooks/standard", body, headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "accepted", "event_id": "msg_a"}
    [row] = events(db)
    assert row[:3] == ("standard", "msg_a", "payment.approved")
    assert row[3] == datetime.fromisoformat(EVENT_AT)
    [job] = queue(db, "device_actions")
    assert job == {
        "type": "service.activate",
        "service_id": "svc-42",
        "event_at": EVENT_AT,
        "reason": "billing payment.approved (payment pay-1)",
        "source": "webhook",
        "actor": "standard",
        "provider": "standard",
        "event_id": "msg_a",
        "payment_id": "pay-1",
    }
    assert row[4:] == ("device_actions", 1)
    assert webhook_server.metric("webhook_events_total", provider="standard", type="payment.approved", outcome="accepted") == 1
    assert webhook_server.metric("webhook_jobs_enqueued_total", queue="device_actions", type="service.activate") == 1


@pytest.mark.parametrize(
    ("event_type", "job_type"),
    [("service.restore", "service.activate"), ("service.suspend", "service.deactivate")],
)
def test_service_events_map_to_device_jobs(webhook_server: RunningServer, db: Conn, event_type: str, job_type: str) -> None:
    body, headers = standard_request(billing_event(event_type, "svc-7"), "msg_s")
    assert post(webhook_server, "/webhooks/standard", body, headers).status_code == 200
    [job] = queue(db, "device_actions")
    assert (job["type"], job["service_id"], job["event_at"]) == (job_type, "svc-7", EVENT_AT)


def test_refund_is_stored_and_counted_but_enqueues_nothing(webhook_server: RunningServer, db: Conn) -> None:
    body, headers = standard_request(billing_event("payment.refunded"), "msg_r")
    response = post(webhook_server, "/webhooks/standard", body, headers)
    assert (response.status_code, response.json()["status"]) == (200, "stored")
    assert [r[2] for r in events(db)] == ["payment.refunded"]
    assert queue(db, "device_actions") == []
    assert webhook_server.metric("webhook_events_total", provider="standard", type="payment.refunded", outcome="stored") == 1


def test_unknown_type_is_stored_counted_and_answered_202(webhook_server: RunningServer, db: Conn) -> None:
    body, headers = standard_request({"type": "invoice.created", "timestamp": EVENT_AT, "data": {}}, "msg_u")
    response = post(webhook_server, "/webhooks/standard", body, headers)
    assert (response.status_code, response.json()["status"]) == (202, "ignored")
    assert [r[2] for r in events(db)] == ["invoice.created"]
    assert queue(db, "device_actions") == []
    assert webhook_server.metric("webhook_events_total", provider="standard", type="other", outcome="ignored") == 1


def test_duplicate_delivery_answers_200_and_enqueues_nothing(webhook_server: RunningServer, db: Conn) -> None:
    body, headers = standard_request(billing_event(), "msg_d")
    assert post(webhook_server, "/webhooks/standard", body, headers).json()["status"] == "accepted"
    # A retry is signed anew (new timestamp) but carries the same webhook-id.
    body, headers = standard_request(billing_event(), "msg_d", ts=time.time() - 5)
    again = post(webhook_server, "/webhooks/standard", body, headers)
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    assert len(events(db)) == 1
    assert len(queue(db, "device_actions")) == 1
    assert webhook_server.metric("webhook_events_total", provider="standard", type="payment.approved", outcome="duplicate") == 1


def test_fifty_concurrent_deliveries_of_one_event_store_one_row_and_one_job(webhook_server: RunningServer, db: Conn) -> None:
    body, headers = standard_request(billing_event(), "msg_50")

    async def deliver_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=webhook_server.base_url, limits=limits, timeout=30) as client:
            return await asyncio.gather(*(client.post("/webhooks/standard", content=body, headers=headers) for _ in range(50)))

    responses = asyncio.run(deliver_all())
    assert [r.status_code for r in responses] == [200] * 50
    statuses = sorted(r.json()["status"] for r in responses)
    assert statuses == ["accepted"] + ["duplicate"] * 49
    assert len(events(db)) == 1
    assert len(queue(db, "device_actions")) == 1


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: h.pop("webhook-signature"), "missing_signature"),
        (lambda h: h.update({"webhook-signature": "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}), "bad_signature"),
        (lambda h: h.update({"webhook-signature": "v1,not base64!"}), "bad_signature"),
        (lambda h: h.update({"webhook-id": "msg_other"}), "bad_signature"),
        (lambda h: h.update({"webhook-timestamp": "soon"}), "bad_timestamp"),
    ],
)
def test_bad_signatures_are_401_and_store_nothing(webhook_server: RunningServer, db: Conn, mutate: Any, reason: str) -> None:
    body, headers = standard_request(billing_event(), "msg_x")
    mutate(headers)
    response = post(webhook_server, "/webhooks/standard", body, headers)
    assert (response.status_code, response.json()) == (401, {"status": "rejected", "reason": reason})
    assert events(db) == []
    assert queue(db, "device_actions") == []
    assert webhook_server.metric("webhook_rejections_total", provider="standard", reason=reason) == 1


def test_tampered_body_is_401(webhook_server: RunningServer, db: Conn) -> None:
    body, headers = standard_request(billing_event(service_id="svc-1"), "msg_t")
    forged = body.replace(b"svc-1", b"svc-9")
    assert post(webhook_server, "/webhooks/standard", forged, headers).status_code == 401
    assert events(db) == []


def test_a_secret_not_configured_is_refused_and_every_active_secret_is_accepted(webhook_server: RunningServer, db: Conn) -> None:
    stranger = "whsec_c29tZWJvZHktZWxzZXMtc2VjcmV0LWtleQ=="
    body, headers = standard_request(billing_event(), "msg_1", secret=stranger)
    assert post(webhook_server, "/webhooks/standard", body, headers).status_code == 401
    from webhook_helpers import STANDARD_SECRETS

    for n, secret in enumerate(STANDARD_SECRETS):
        body, headers = standard_request(billing_event(), f"msg_rot_{n}", secret=secret)
        assert post(webhook_server, "/webhooks/standard", body, headers).status_code == 200
    assert len(events(db)) == 2


@pytest.mark.parametrize("offset", [-310, 310])  # header seconds are truncated: keep clear of the edge
def test_timestamp_outside_the_tolerance_is_401(webhook_server: RunningServer, db: Conn, offset: int) -> None:
    body, headers = standard_request(billing_event(), "msg_old", ts=time.time() + offset)
    response = post(webhook_server, "/webhooks/standard", body, headers)
    assert (response.status_code, response.json()["reason"]) == (401, "timestamp_out_of_window")
    assert events(db) == []


def test_tolerance_is_configurable(webhook_db: str) -> None:
    with serve(make_settings(standard_tolerance_seconds=30), webhook_db) as server:
        body, headers = standard_request(billing_event(), "msg_w", ts=time.time() - 60)
        assert post(server, "/webhooks/standard", body, headers).status_code == 401
        body, headers = standard_request(billing_event(), "msg_w", ts=time.time() - 20)
        assert post(server, "/webhooks/standard", body, headers).status_code == 200


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b"[1, 2]", "schema"),
        (json.dumps({"type": "payment.approved", "timestamp": EVENT_AT[:19], "data": {"service_id": "s", "payment_id": "p"}}).encode(), "schema"),
        (json.dumps({"type": "payment.approved", "timestamp": EVENT_AT, "data": {"payment_id": "p"}}).encode(), "schema"),
        (json.dumps({"type": "payment.approved", "timestamp": EVENT_AT, "data": {"service_id": "s"}}).encode(), "schema"),
        (json.dumps({"type": "service.suspend", "data": {"service_id": "s"}}).encode(), "schema"),
    ],
)
def test_malformed_or_invalid_bodies_are_400(webhook_server: RunningServer, db: Conn, body: bytes, reason: str) -> None:
    # Signed correctly (the sender is genuine) but not an event we can accept.
    _, headers = standard_request(b"{}", "msg_bad")
    from payment_webhook import sign_standard
    from webhook_helpers import STANDARD_SECRETS

    headers["webhook-signature"] = sign_standard(STANDARD_SECRETS[0], "msg_bad", int(headers["webhook-timestamp"]), body)
    response = post(webhook_server, "/webhooks/standard", body, headers)
    assert (response.status_code, response.json()["reason"]) == (400, reason)
    assert b"service_id" not in response.content or reason == "schema"
    assert events(db) == []


def test_body_over_the_limit_is_413_by_content_length_without_reading_it(webhook_server: RunningServer, db: Conn) -> None:
    # Declare 100 MB, send only the headers: the answer must come without the server waiting for the body.
    with socket.create_connection(("127.0.0.1", webhook_server.server.servers[0].sockets[0].getsockname()[1]), timeout=10) as sock:
        sock.sendall(
            b"POST /webhooks/standard HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n{\"type\":"
        )
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert events(db) == []
    assert webhook_server.metric("webhook_rejections_total", provider="standard", reason="body_too_large") == 1


def test_chunked_body_over_the_limit_is_413_while_streaming(webhook_db: str) -> None:
    with serve(make_settings(max_body_bytes=1024), webhook_db) as server:
        sent = 0

        def chunks() -> Any:
            nonlocal sent
            for _ in range(100):
                sent += 512
                yield b" " * 512

        _, headers = standard_request(billing_event(), "msg_big")
        response = httpx.post(server.base_url + "/webhooks/standard", content=chunks(), headers=headers, timeout=10)
        assert response.status_code == 413
        assert server.metric("webhook_rejections_total", provider="standard", reason="body_too_large") == 1
        # Just under the limit is fine.
        small, headers = standard_request(billing_event(), "msg_small")
        assert len(small) < 1024
        assert post(server, "/webhooks/standard", small, headers).status_code == 200


def test_failure_after_the_insert_leaves_neither_row_nor_job(webhook_server: RunningServer, db: Conn) -> None:
    # The queue's table is gone: pgmq.send fails after the event row was inserted, in the same transaction.
    db.execute("ALTER TABLE pgmq.q_device_actions RENAME TO q_device_actions_away")
    body, headers = standard_request(billing_event(), "msg_f")
    response = post(webhook_server, "/webhooks/standard", body, headers)
    assert (response.status_code, response.json()["reason"]) == (503, "database_error")
    assert events(db) == []
    assert webhook_server.metric("webhook_rejections_total", provider="standard", reason="database_error") == 1
    # The provider's retry, once the queue is back, is taken as new: nothing was half-written.
    db.execute("ALTER TABLE pgmq.q_device_actions_away RENAME TO q_device_actions")
    assert post(webhook_server, "/webhooks/standard", body, headers).json()["status"] == "accepted"
    assert len(events(db)) == 1
    assert len(queue(db, "device_actions")) == 1


# --- Mercado Pago -------------------------------------------------------------------------------------------------


def test_mercadopago_payment_notification_enqueues_payments_sync(webhook_server: RunningServer, db: Conn) -> None:
    query, body, headers = mp_request("123456789", "n-100")
    response = post(webhook_server, "/webhooks/mercadopago" + query, body, headers)
    assert (response.status_code, response.json()["status"]) == (200, "accepted")
    [row] = events(db)
    # The event's identity is what the signature covers (data.id and x-request-id), not the body's unsigned id.
    assert row[:3] == ("mercadopago", "id:123456789;request-id:req-1;", "payment.updated")
    [job] = queue(db, "payment_sync")
    assert job["type"] == "payments.sync"
    assert (job["provider"], job["payment_id"]) == ("mercadopago", "123456789")
    assert abs(datetime.fromisoformat(job["notified_at"]).timestamp() - time.time()) < 60
    # Mercado Pago retries the same notification (same x-request-id, signed anew): stored once, one job.
    query, body, headers = mp_request("123456789", "n-100", ts=str(int(time.time()) - 3))
    again = post(webhook_server, "/webhooks/mercadopago" + query, body, headers)
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    assert len(queue(db, "payment_sync")) == 1


def test_mercadopago_rotated_secrets_are_all_accepted(webhook_server: RunningServer, db: Conn) -> None:
    for n, secret in enumerate(MP_SECRETS):
        query, body, headers = mp_request("555", f"n-rot-{n}", secret=secret, request_id=f"req-rot-{n}")
        assert post(webhook_server, "/webhooks/mercadopago" + query, body, headers).status_code == 200
    query, body, headers = mp_request("555", "n-rot-x", secret="an-old-revoked-secret")
    response = post(webhook_server, "/webhooks/mercadopago" + query, body, headers)
    assert (response.status_code, response.json()["reason"]) == (401, "bad_signature")
    assert len(events(db)) == 2


def test_mercadopago_alphanumeric_data_id_is_lowercased_in_the_manifest(webhook_server: RunningServer, db: Conn) -> None:
    # Mercado Pago's documentation: the lowercased id is signed; the query string may carry it in upper case.
    query, body, headers = mp_request("abc123", "n-alnum")
    response = post(webhook_server, "/webhooks/mercadopago" + query.replace("abc123", "ABC123"), body, headers)
    assert response.status_code == 200, response.text
    # The id goes on as received (an Orders API id is upper case and must be looked up as such).
    assert queue(db, "payment_sync")[0]["payment_id"] == "ABC123"


def test_mercadopago_data_id_signed_as_received_is_accepted_too(webhook_server: RunningServer, db: Conn) -> None:
    # Mercado Pago's SDKs since June 2026 sign data.id with its original casing (sdk-python#118 and siblings).
    query, body, headers = mp_request("ORDTST01ABC", "n-upper")
    response = post(webhook_server, "/webhooks/mercadopago" + query, body, headers)
    assert response.status_code == 200, response.text
    assert queue(db, "payment_sync")[0]["payment_id"] == "ORDTST01ABC"


def test_mercadopago_without_x_request_id_verifies_and_dedups_on_the_signed_ts(webhook_server: RunningServer, db: Conn) -> None:
    stamp = str(int(time.time()))
    query, body, headers = mp_request("4242", "n-norid", request_id=None, ts=stamp)
    assert "x-request-id" not in headers
    response = post(webhook_server, "/webhooks/mercadopago" + query, body, headers)
    assert (response.status_code, response.json()["status"]) == (200, "accepted"), response.text
    assert [r[1] for r in events(db)] == [f"id:4242;ts:{stamp};"]
    again = post(webhook_server, "/webhooks/mercadopago" + query, body.replace(b'"n-norid"', b'"n-other"'), headers)
    assert again.json()["status"] == "duplicate"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("data_id", "bad_signature"),
        ("request_id", "bad_signature"),
        ("no_signature", "missing_signature"),
        ("no_request_id", "bad_signature"),  # allowed, but then the manifest differs from the signed one
        ("garbled", "missing_signature"),
    ],
)
def test_mercadopago_bad_signatures_are_401(webhook_server: RunningServer, db: Conn, change: str, reason: str) -> None:
    query, body, headers = mp_request("777", "n-bad")
    if change == "data_id":
        query = query.replace("777", "778")
    elif change == "request_id":
        headers["x-request-id"] = "req-other"
    elif change == "no_signature":
        del headers["x-signature"]
    elif change == "no_request_id":
        del headers["x-request-id"]
    else:
        headers["x-signature"] = "garbage"
    response = post(webhook_server, "/webhooks/mercadopago" + query, body, headers)
    assert (response.status_code, response.json()["reason"]) == (401, reason)
    assert events(db) == []
    assert queue(db, "payment_sync") == []


def test_mercadopago_replay_window(webhook_db: str) -> None:
    with serve(make_settings(mercadopago_replay_window_seconds=60), webhook_db) as server:
        query, body, headers = mp_request("9", "n-old", ts=str(int(time.time()) - 120))
        response = post(server, "/webhooks/mercadopago" + query, body, headers)
        assert (response.status_code, response.json()["reason"]) == (401, "timestamp_out_of_window")
        # Milliseconds, as some deliveries carry them, inside the window.
        query, body, headers = mp_request("9", "n-ms", ts=str(int(time.time() * 1000) - 30_000))
        assert post(server, "/webhooks/mercadopago" + query, body, headers).status_code == 200
        assert server.metric("webhook_rejections_total", provider="mercadopago", reason="timestamp_out_of_window") == 1


def test_mercadopago_other_topics_are_stored_without_a_job(webhook_server: RunningServer, db: Conn) -> None:
    query, body, headers = mp_request("31", "n-order", kind="merchant_order")
    response = post(webhook_server, "/webhooks/mercadopago" + query, body, headers)
    # Mercado Pago retries anything but 200/201, so an unknown topic is a 200 (body says "ignored").
    assert (response.status_code, response.json()["status"]) == (200, "ignored")
    assert [r[2] for r in events(db)] == ["merchant_order"]
    assert queue(db, "payment_sync") == []


def test_mercadopago_body_disagreeing_with_the_signed_id_is_400(webhook_server: RunningServer, db: Conn) -> None:
    query, body, headers = mp_request("1000", "n-mismatch")
    forged = body.replace(b'"id": "1000"', b'"id": "2000"')
    assert forged != body
    response = post(webhook_server, "/webhooks/mercadopago" + query, forged, headers)
    assert (response.status_code, response.json()["reason"]) == (400, "schema")
    assert events(db) == []


# --- health, readiness, metrics -----------------------------------------------------------------------------------


def test_health_readiness_and_metrics(webhook_server: RunningServer) -> None:
    assert httpx.get(webhook_server.base_url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(webhook_server.base_url + "/readyz")
    assert (ready.status_code, ready.json()["status"]) == (200, "ready")
    body, headers = standard_request(billing_event(), "msg_m")
    headers["webhook-signature"] = "v1,AAAA"
    post(webhook_server, "/webhooks/standard", body, headers)
    text = httpx.get(webhook_server.base_url + "/metrics").text
    assert 'webhook_rejections_total{provider="standard",reason="bad_signature"} 1.0' in text
    assert "webhook_request_duration_seconds_bucket" in text


def test_unconfigured_provider_is_404(webhook_db: str) -> None:
    with serve(make_settings(mercadopago_secrets=None), webhook_db) as server:
        query, body, headers = mp_request()
        response = post(server, "/webhooks/mercadopago" + query, body, headers)
        assert (response.status_code, response.json()["reason"]) == (404, "provider_disabled")


def test_rejections_are_logged_without_secrets_or_bodies(webhook_server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    body, headers = standard_request(billing_event(service_id="svc-secret-customer"), "msg_log")
    headers["webhook-signature"] = headers["webhook-signature"][:-6] + "AAAA=="
    with caplog.at_level("INFO", logger="payment_webhook"):
        post(webhook_server, "/webhooks/standard", body, headers)
    [record] = [r for r in caplog.records if getattr(r, "event", "") == "webhook_rejected"]
    assert (record.__dict__["reason"], record.__dict__["delivery_id"]) == ("bad_signature", "msg_log")
    logged = repr(record.__dict__)
    assert "svc-secret-customer" not in logged
    from webhook_helpers import STANDARD_SECRETS

    assert all(secret not in logged and secret[6:] not in logged for secret in STANDARD_SECRETS)
    assert headers["webhook-signature"] not in logged


class _ExplodingProducer(AsyncProducer):
    """pg-worker's producer that fails after the event row was inserted (a bug, not a database error)."""

    async def enqueue(self, *args: Any, **kwargs: Any) -> int:
        raise RuntimeError("boom after the insert")


def test_unexpected_error_after_the_insert_is_500_counted_logged_and_rolled_back(
    webhook_db: str, db: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    with serve(make_settings(), webhook_db, producer=_ExplodingProducer()) as server:
        body, headers = standard_request(billing_event(), "msg_boom")
        with caplog.at_level("ERROR", logger="payment_webhook"):
            response = post(server, "/webhooks/standard", body, headers)
        assert (response.status_code, response.json()["reason"]) == (500, "internal_error")
        assert server.metric("webhook_rejections_total", provider="standard", reason="internal_error") == 1
    assert [r.__dict__["event"] for r in caplog.records if r.levelname == "ERROR"] == ["webhook_failed", "webhook_rejected"]
    assert events(db) == []
    assert queue(db, "device_actions") == []


def test_a_client_that_goes_away_mid_body_is_counted_and_nothing_is_stored(webhook_server: RunningServer, db: Conn) -> None:
    port = webhook_server.server.servers[0].sockets[0].getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /webhooks/standard HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{\"type\":")
    deadline = time.monotonic() + 10
    while webhook_server.metric("webhook_rejections_total", provider="standard", reason="client_disconnected") < 1:
        assert time.monotonic() < deadline, "the disconnect was not counted"
        time.sleep(0.01)
    assert webhook_server.metric("webhook_rejections_total", provider="standard", reason="internal_error") == 0
    assert events(db) == []
