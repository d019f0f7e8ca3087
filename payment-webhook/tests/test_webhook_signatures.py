"""Signature checks, against the reference implementation (standardwebhooks) and Mercado Pago's manifest."""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr
from standardwebhooks import Webhook

from payment_webhook import (
    SchemaError,
    SignatureError,
    sign_mercadopago,
    sign_standard,
    standard_event,
    verify_mercadopago,
    verify_standard,
)
from payment_webhook._events import TimeWindow
from payment_webhook._signatures import mercadopago_manifest
from webhook_helpers import STANDARD_SECRETS

SECRETS = tuple(SecretStr(s) for s in STANDARD_SECRETS)
NOW = 1_800_000_000.0


def _headers(msg_id: str, ts: int, signature: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def test_our_signature_is_the_reference_implementations() -> None:
    body = b'{"type":"payment.approved"}'
    when = datetime.fromtimestamp(NOW, UTC)
    for secret in STANDARD_SECRETS:
        assert sign_standard(secret, "msg_1", int(NOW), body) == Webhook(secret).sign("msg_1", when, body.decode())


def test_reference_signed_request_verifies_and_returns_its_id() -> None:
    body = b'{"a":1}'
    signature = Webhook(STANDARD_SECRETS[1]).sign("msg_2", datetime.fromtimestamp(NOW, UTC), body.decode())
    # Several signatures in one header (the sender signs with old and new secret during a rotation).
    header = f"v1,{'A' * 44} v2,whatever {signature}"
    assert verify_standard(SECRETS, _headers("msg_2", int(NOW), header), body, now=NOW, tolerance=300) == ("msg_2", NOW)


@pytest.mark.parametrize(
    ("ts", "reason"),
    [(NOW - 301, "timestamp_out_of_window"), (NOW + 301, "timestamp_out_of_window"), (float("nan"), "bad_timestamp")],
)
def test_standard_timestamp_window(ts: float, reason: str) -> None:
    body = b"{}"
    stamp = "nan" if ts != ts else str(int(ts))
    signature = sign_standard(STANDARD_SECRETS[0], "m", 0 if ts != ts else int(ts), body)
    with pytest.raises(SignatureError) as info:
        verify_standard(SECRETS, {"webhook-id": "m", "webhook-timestamp": stamp, "webhook-signature": signature}, body, now=NOW, tolerance=300)
    assert info.value.reason == reason


def test_standard_rejects_an_unknown_secret_and_never_shows_secrets() -> None:
    body = b"{}"
    other = "whsec_" + "b3RoZXI="
    with pytest.raises(SignatureError) as info:
        verify_standard(SECRETS, _headers("m", int(NOW), sign_standard(other, "m", int(NOW), body)), body, now=NOW, tolerance=300)
    assert info.value.reason == "bad_signature"
    assert all(s not in str(info.value) for s in STANDARD_SECRETS)


def test_mercadopago_manifest_and_signature() -> None:
    # The template documented by Mercado Pago, with a trailing ";".
    assert mercadopago_manifest("123456", "bb56a2f1-6aae-46ac-982e-9dcd3581d08e", "1704908010") == (
        "id:123456;request-id:bb56a2f1-6aae-46ac-982e-9dcd3581d08e;ts:1704908010;"
    )
    assert mercadopago_manifest("ABC123", "r", "1") == "id:ABC123;request-id:r;ts:1;"  # the caller picks the form
    assert mercadopago_manifest(None, "r", "1") == "request-id:r;ts:1;"  # an absent value leaves its part out
    expected = hmac.new(b"secret", b"id:123456;request-id:r-1;ts:1704908010;", hashlib.sha256).hexdigest()
    assert sign_mercadopago("secret", "123456", "r-1", "1704908010") == f"ts=1704908010,v1={expected}"


def test_mercadopago_verification_with_rotated_secrets_and_window() -> None:
    secrets = (SecretStr("old"), SecretStr("new"))
    now = time.time()
    ts = str(int(now))
    for secret in ("old", "new"):
        header = sign_mercadopago(secret, "42", "req", ts)
        assert verify_mercadopago(secrets, header, "req", "42", now=now, window=300).notified_at == int(ts)
    with pytest.raises(SignatureError, match="no signature matches"):
        verify_mercadopago(secrets, sign_mercadopago("revoked", "42", "req", ts), "req", "42", now=now, window=300)
    stale = str(int(now) - 400)
    with pytest.raises(SignatureError) as info:
        verify_mercadopago(secrets, sign_mercadopago("new", "42", "req", stale), "req", "42", now=now, window=300)
    assert info.value.reason == "timestamp_out_of_window"
    # Spaces after the comma, as some clients send them, and an upper-case hex digest.
    spaced = sign_mercadopago("new", "42", "req", ts).replace(",", ", ").upper().replace("TS=", "ts=").replace("V1=", "v1=")
    assert verify_mercadopago(secrets, spaced, "req", "42", now=now, window=300).notified_at == int(ts)


RECEIVED = datetime(2026, 11, 29, 18, 5, tzinfo=UTC)


def _event(event_id: str, body: object) -> object:
    return standard_event(event_id, body, received_at=RECEIVED, window=TimeWindow(timedelta(days=7), timedelta(minutes=5)))


def test_event_schema_rules() -> None:
    event = _event("msg_1", {"type": "service.suspend", "timestamp": "2026-11-29T18:00:00+00:00", "data": {"service_id": 1001}})
    assert event.job is not None  # type: ignore[attr-defined]
    assert event.job.payload == {  # type: ignore[attr-defined]
        "type": "service.deactivate", "service_id": "1001", "event_at": "2026-11-29T18:00:00+00:00",
        "reason": "billing service.suspend (event msg_1)", "source": "webhook", "actor": "standard", "provider": "standard",
        "event_id": "msg_1", "payment_id": None,
    }
    with pytest.raises(SchemaError, match="webhook-id"):
        _event("m" * 201, {"type": "service.suspend", "timestamp": "2026-11-29T18:00:00Z", "data": {"service_id": "s"}})
    with pytest.raises(SchemaError, match="service_id") as info:
        _event("msg_2", {"type": "service.restore", "timestamp": "2026-11-29T18:00:00Z", "data": {"service_id": "", "note": "private"}})
    assert "private" not in str(info.value)
