"""Mercado Pago: a captured notification (headers and URL, e.g. from a proxy log) replayed with new bodies.

Only ``data.id``, ``x-request-id`` and ``ts`` are signed. Keyed on the body's ``id``, every replay with a new
body id was a new event and a new ``payments.sync`` job, and a replay under a *future* id made the genuine
notification a "duplicate" (200, no job: Mercado Pago stops retrying and the payment is never synced).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import psycopg

from webhook_helpers import RunningServer, event_rows, mp_request, queue

Conn = psycopg.Connection[tuple[Any, ...]]


def _post(server: RunningServer, query: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.base_url + "/webhooks/mercadopago" + query, content=body, headers=headers, timeout=10)


def test_replays_of_a_captured_notification_with_new_bodies_are_duplicates(webhook_server: RunningServer, db: Conn) -> None:
    query, body, headers = mp_request("1311772470", "n-genuine", request_id="bb56a2f1-6aae-46ac-982e-9dcd3581d08e")
    assert _post(webhook_server, query, body, headers).json()["status"] == "accepted"
    original = json.loads(body)
    for n in range(11):
        # A new unsigned id each time, and padding that used to be stored (20 MB in 2 s at 300 replays).
        forged = {**original, "id": f"n-replay-{n}", "padding": "x" * 30_000}
        response = _post(webhook_server, query, json.dumps(forged).encode(), headers)
        assert (response.status_code, response.json()["status"]) == (200, "duplicate"), response.text
    [row] = event_rows(db)
    assert row["payload"]["id"] == "n-genuine"
    assert len(queue(db, "payment_sync")) == 1
    assert webhook_server.metric("webhook_events_total", provider="mercadopago", type="payment.updated", outcome="duplicate") == 11


def test_a_replay_under_a_future_id_cannot_preempt_the_genuine_notification(webhook_server: RunningServer, db: Conn) -> None:
    # The attacker holds yesterday's notification for payment 1000 and guesses the id of the next notification.
    query, body, headers = mp_request("1000", "n-41", request_id="req-old")
    assert _post(webhook_server, query, body, headers).json()["status"] == "accepted"
    forged = {**json.loads(body), "id": "n-42"}
    assert _post(webhook_server, query, json.dumps(forged).encode(), headers).json()["status"] == "duplicate"
    # The genuine notification n-42 (another payment, its own request id) arrives: taken, and its job enqueued.
    query, body, headers = mp_request("2000", "n-42", request_id="req-new")
    response = _post(webhook_server, query, body, headers)
    assert (response.status_code, response.json()["status"]) == (200, "accepted"), response.text
    assert [job["payment_id"] for job in queue(db, "payment_sync")] == ["1000", "2000"]
    jobs = queue(db, "payment_sync")
    assert jobs[1]["event_id"] == "id:2000;request-id:req-new;"
    assert (jobs[1]["source"], jobs[1]["actor"]) == ("webhook", "mercadopago")
    assert [r["payment_id"] for r in event_rows(db)] == ["1000", "2000"]


def test_every_casing_of_a_lowercase_signed_data_id_is_the_same_event(webhook_server: RunningServer, db: Conn) -> None:
    # Signed in lowercase (Mercado Pago's documented rule): every casing of the id in the URL verifies, and a
    # replay in another casing must not be a new event.
    query, body, headers = mp_request("ordtst01abc", "n-case", request_id="req-case")
    first = _post(webhook_server, query.replace("ordtst01abc", "ORDTST01ABC"), body, headers)
    assert first.json()["status"] == "accepted", first.text
    for casing in ("OrDtSt01AbC", "ordtst01abc", "ORDTST01ABc"):
        again = _post(webhook_server, query.replace("ordtst01abc", casing), body, headers)
        assert again.json()["status"] == "duplicate", casing
    assert [job["payment_id"] for job in queue(db, "payment_sync")] == ["ORDTST01ABC"]
