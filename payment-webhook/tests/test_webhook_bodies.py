"""Every signed body that is not a valid event is a 400 with a stable reason, before any database work.

Before: NaN, Infinity, 1e400, NUL or a lone surrogate gave 503 (jsonb refused them, the provider retried for
ever); a 5,000-digit integer or 30,000-deep nesting gave 500; a year-9999 timestamp was stored (and made every
later event of that service "stale" in the worker); amounts like "abc" or negatives were accepted.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest

from payment_webhook import sign_standard
from webhook_fixtures import make_settings
from webhook_helpers import (
    EVENT_AT,
    STANDARD_SECRETS,
    RunningServer,
    billing_event,
    event_rows,
    mp_request,
    queue,
    serve,
)

Conn = psycopg.Connection[tuple[Any, ...]]


def _signed_post(server: RunningServer, body: bytes, msg_id: str = "msg_body") -> httpx.Response:
    ts = int(time.time())
    headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
               "webhook-signature": sign_standard(STANDARD_SECRETS[0], msg_id, ts, body)}
    return httpx.post(server.base_url + "/webhooks/standard", content=body, headers=headers, timeout=10)


def _event_with(**data: Any) -> bytes:
    return json.dumps(billing_event(**data)).encode()


def _at(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


_APPROVED = '{"type": "payment.approved", "timestamp": "%s", "data": {"service_id": "s", "payment_id": "p", "amount": %s, "currency": "ARS"}}'


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_APPROVED.replace("%s", EVENT_AT, 1).replace("%s", "NaN").encode(), "non_finite_number"),
        (_APPROVED.replace("%s", EVENT_AT, 1).replace("%s", "-Infinity").encode(), "non_finite_number"),
        (_APPROVED.replace("%s", EVENT_AT, 1).replace("%s", "1e400").encode(), "number_out_of_range"),
        (_APPROVED.replace("%s", EVENT_AT, 1).replace("%s", "1" * 5000).encode(), "number_too_long"),
        (_event_with(note="a\u0000b"), "invalid_string"),
        (_event_with(service_id="svc-\ud800"), "invalid_string"),  # json.dumps writes it as the escape \\ud800
        (b'{"type": "x", "n\\u0000": 1}', "invalid_string"),
        (b"[" * 30_000 + b"]" * 30_000, "too_deep"),
        (b'{"a":' * 20 + b"1" + b"}" * 20, "too_deep"),
        (json.dumps(billing_event() | {"timestamp": "9999-12-31T23:59:59Z"}).encode(), "event_time_out_of_window"),
        (json.dumps(billing_event() | {"timestamp": _at(timedelta(minutes=10))}).encode(), "event_time_out_of_window"),
        (json.dumps(billing_event() | {"timestamp": _at(-timedelta(days=8))}).encode(), "event_time_out_of_window"),
        (_event_with(amount="abc"), "invalid_amount"),
        (_event_with(amount="-5.00"), "invalid_amount"),
        (_event_with(amount="0.00"), "invalid_amount"),
        (_event_with(amount="1.234"), "invalid_amount"),
        (_event_with(amount=1500), "invalid_amount"),
        (_event_with(amount=None), "invalid_amount"),
        (_event_with(currency="XYZ"), "invalid_currency"),
        (_event_with(currency="ars"), "invalid_currency"),
        (_event_with(currency="XAU"), "invalid_currency"),
    ],
)
def test_invalid_bodies_are_400_with_a_stable_reason_and_store_nothing(
    webhook_server: RunningServer, db: Conn, body: bytes, reason: str
) -> None:
    response = _signed_post(webhook_server, body)
    assert (response.status_code, response.json()) == (400, {"status": "rejected", "reason": reason}), response.text
    assert event_rows(db) == []
    assert webhook_server.metric("webhook_rejections_total", provider="standard", reason=reason) == 1


def test_the_unsigned_mercadopago_body_is_checked_the_same_way(webhook_server: RunningServer, db: Conn) -> None:
    query, body, headers = mp_request("77", "n-nan")
    bad = body.replace(b'"user_id": 44', b'"user_id": NaN')
    assert bad != body
    response = httpx.post(webhook_server.base_url + "/webhooks/mercadopago" + query, content=bad, headers=headers, timeout=10)
    assert (response.status_code, response.json()["reason"]) == (400, "non_finite_number")
    future = body.replace(b'"date_created": "', b'"date_created": "2999-01-01T00:00:00Z", "was": "')
    response = httpx.post(webhook_server.base_url + "/webhooks/mercadopago" + query, content=future, headers=headers, timeout=10)
    assert (response.status_code, response.json()["reason"]) == (400, "event_time_out_of_window")
    assert event_rows(db) == []


def test_amount_and_currency_are_stored(webhook_server: RunningServer, db: Conn) -> None:
    response = _signed_post(webhook_server, _event_with(amount="1500.5", currency="USD", payment_id="p-9"), "msg_amount")
    assert response.json()["status"] == "accepted"
    [row] = event_rows(db)
    assert (row["amount"], row["currency"], row["service_id"], row["payment_id"], row["outcome"]) == (
        Decimal("1500.50"), "USD", "svc-1001", "p-9", "accepted")
    assert queue(db, "device_actions")[0]["payment_id"] == "p-9"


def test_the_event_time_window_is_configurable(webhook_db: str) -> None:
    with serve(make_settings(event_max_age_seconds=60, event_max_ahead_seconds=0), webhook_db) as server:
        old = json.dumps(billing_event() | {"timestamp": _at(-timedelta(minutes=5))}).encode()
        assert _signed_post(server, old, "msg_old").json()["reason"] == "event_time_out_of_window"
        fresh = json.dumps(billing_event() | {"timestamp": _at(-timedelta(seconds=5))}).encode()
        assert _signed_post(server, fresh, "msg_fresh").json()["status"] == "accepted"
