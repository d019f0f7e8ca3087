"""Signature checks of the two providers, constant-time, with several active secrets.

Standard Webhooks: HMAC-SHA256 over ``{webhook-id}.{webhook-timestamp}.{body}`` with the base64-decoded
``whsec_`` secret; ``webhook-signature`` is a space-separated list of ``v1,<base64>``. The ``standardwebhooks``
package implements the same scheme with a fixed 5-minute tolerance and one secret; here the tolerance is
configurable and every active secret is tried (its ``sign`` is used by ``send-test-event`` and by the tests, so
both sides are checked against the reference implementation).

Mercado Pago: ``x-signature: ts=<ts>,v1=<hex>``; HMAC-SHA256 with the secret over
``id:<data.id>;request-id:<x-request-id>;ts:<ts>;``, where ``data.id`` comes from the query string (lowercased
when alphanumeric) and a part whose value is absent is left out. The body is not signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import SecretStr

STANDARD_PREFIX = "whsec_"


class SignatureError(Exception):
    """A request is not genuine. ``reason`` is a stable label for metrics and logs (never a secret)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def decode_standard_secret(secret: str) -> bytes:
    raw = secret[len(STANDARD_PREFIX) :] if secret.startswith(STANDARD_PREFIX) else secret
    if not _BASE64.fullmatch(raw):  # b64decode(validate=False) would drop the bad characters and call it "empty"
        raise ValueError("a Standard Webhooks secret is not valid base64 (expected whsec_<base64>)")
    try:
        key = base64.b64decode(raw + "==", validate=False)
    except (binascii.Error, ValueError):
        raise ValueError("a Standard Webhooks secret is not valid base64 (expected whsec_<base64>)") from None
    if not key:
        raise ValueError("a Standard Webhooks secret is empty")
    return key


def _any_match(expected: Iterable[bytes], offered: Iterable[bytes]) -> bool:
    # Compare every pair without stopping early: the time taken does not tell which secret or which entry matched.
    matched = False
    for mine in expected:
        for theirs in offered:
            matched |= hmac.compare_digest(mine, theirs)
    return matched


def _parse_timestamp(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SignatureError("bad_timestamp", "timestamp is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SignatureError("bad_timestamp", "timestamp is not a number")
    return value


def _check_window(ts: float, now: float, tolerance: float) -> None:
    if abs(now - ts) > tolerance:
        raise SignatureError("timestamp_out_of_window", f"timestamp is {now - ts:.0f} s from now (tolerance {tolerance:.0f} s)")


def sign_standard(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for a body (what the billing system sends)."""
    digest = hmac.new(decode_standard_secret(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_standard(secrets: Iterable[SecretStr], headers: Mapping[str, str], body: bytes, *, now: float, tolerance: float) -> tuple[str, float]:
    """Check a Standard Webhooks request; returns ``(webhook-id, timestamp)`` or raises SignatureError."""
    msg_id = headers.get("webhook-id", "")
    raw_ts = headers.get("webhook-timestamp", "")
    raw_sig = headers.get("webhook-signature", "")
    if not (msg_id and raw_ts and raw_sig):
        raise SignatureError("missing_signature", "webhook-id, webhook-timestamp and webhook-signature are required")
    ts = _parse_timestamp(raw_ts)
    _check_window(ts, now, tolerance)
    offered: list[bytes] = []
    for entry in raw_sig.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue
        try:
            offered.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    if not offered:
        raise SignatureError("bad_signature", "no v1 signature in webhook-signature")
    signed = f"{msg_id}.{raw_ts}.".encode() + body
    expected = [hmac.new(decode_standard_secret(s.get_secret_value()), signed, hashlib.sha256).digest() for s in secrets]
    if not _any_match(expected, offered):
        raise SignatureError("bad_signature", "no signature matches an active secret")
    return msg_id, ts


@dataclass(frozen=True)
class MercadoPagoSignature:
    ts: str
    v1: tuple[str, ...]


def parse_x_signature(value: str) -> MercadoPagoSignature:
    ts = ""
    v1: list[str] = []
    for part in value.split(","):
        key, _, val = part.strip().partition("=")
        if key == "ts":
            ts = val.strip()
        elif key == "v1":
            v1.append(val.strip())
    if not ts or not v1:
        raise SignatureError("missing_signature", "x-signature needs ts=... and v1=...")
    return MercadoPagoSignature(ts, tuple(v1))


def normalize_data_id(data_id: str) -> str:
    return data_id.lower() if data_id.isalnum() else data_id


def mercadopago_manifest(data_id: str | None, request_id: str | None, ts: str) -> str:
    parts = []
    if data_id:
        parts.append(f"id:{normalize_data_id(data_id)};")
    if request_id:
        parts.append(f"request-id:{request_id};")
    parts.append(f"ts:{ts};")
    return "".join(parts)


def mercadopago_ts_seconds(ts: float) -> float:
    # Mercado Pago documents seconds, but deliveries with milliseconds are seen too: 1e11 s is the year 5138.
    return ts / 1000.0 if ts > 1e11 else ts


def sign_mercadopago(secret: str, data_id: str | None, request_id: str | None, ts: str) -> str:
    """The ``x-signature`` value Mercado Pago would send."""
    digest = hmac.new(secret.encode(), mercadopago_manifest(data_id, request_id, ts).encode(), hashlib.sha256).hexdigest()
    return f"ts={ts},v1={digest}"


def verify_mercadopago(
    secrets: Iterable[SecretStr], x_signature: str, request_id: str, data_id: str | None, *, now: float, window: float
) -> float:
    """Check a Mercado Pago notification; returns its signed time (epoch seconds) or raises SignatureError."""
    if not x_signature:
        raise SignatureError("missing_signature", "x-signature header is missing")
    if not request_id:
        raise SignatureError("missing_signature", "x-request-id header is missing")
    signature = parse_x_signature(x_signature)
    ts = mercadopago_ts_seconds(_parse_timestamp(signature.ts))
    _check_window(ts, now, window)
    manifest = mercadopago_manifest(data_id, request_id, signature.ts).encode()
    expected = [hmac.new(s.get_secret_value().encode(), manifest, hashlib.sha256).hexdigest().encode() for s in secrets]
    offered = [v.lower().encode() for v in signature.v1]
    if not _any_match(expected, offered):
        raise SignatureError("bad_signature", "no signature matches an active secret")
    return ts
