"""Signature checks of the two providers, constant-time, with several active secrets.

Standard Webhooks: HMAC-SHA256 over ``{webhook-id}.{webhook-timestamp}.{body}`` with the base64-decoded
``whsec_`` secret; ``webhook-signature`` is a space-separated list of ``v1,<base64>``. The ``standardwebhooks``
package implements the same scheme with a fixed 5-minute tolerance and one secret; here the tolerance is
configurable and every active secret is tried (its ``sign`` is used by ``send-test-event`` and by the tests, so
both sides are checked against the reference implementation).

Mercado Pago: ``x-signature: ts=<ts>,v1=<hex>``; HMAC-SHA256 with the secret over
``id:<data.id>;request-id:<x-request-id>;ts:<ts>;``, where ``data.id`` comes from the query string (as received,
or lowercased when alphanumeric: see ``data_id_forms``) and a part whose value is absent is left out. The body is
not signed, so nothing in it may decide which event a request is (see ``MercadoPagoVerified.event_id``).
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


_BASE64_ALPHABET = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def decode_standard_secret(secret: str) -> bytes:
    """The key of a ``whsec_<base64>`` secret (the prefix is optional, as in the reference package).

    Strict: a character outside the base64 alphabet is an error (the lax decoder drops it silently, which turned
    ``whsec_change-me`` into a 6-byte key). Missing padding is accepted, as the reference package accepts it.
    Errors never contain the secret.
    """
    raw = secret[len(STANDARD_PREFIX) :] if secret.startswith(STANDARD_PREFIX) else secret
    if not raw:
        raise ValueError("a Standard Webhooks secret is empty")
    if not _BASE64_ALPHABET.fullmatch(raw) or len(raw.rstrip("=")) % 4 == 1:
        raise ValueError("a Standard Webhooks secret is not strict base64 after whsec_")
    unpadded = raw.rstrip("=")
    try:
        key = base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a Standard Webhooks secret is not strict base64 after whsec_") from None
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


# Unix seconds as the reference package writes them (``str(floor(ts))``): digits only, no sign, no fraction, no
# exponent, no leading zero. Anything else would be signed as one string and checked as another.
_TIMESTAMP = re.compile(r"[1-9][0-9]{0,12}")


def _parse_timestamp(raw: str) -> float:
    if not _TIMESTAMP.fullmatch(raw):
        raise SignatureError("bad_timestamp", "timestamp is not a whole number of seconds")
    return float(raw)


def _check_window(ts: float, now: float, tolerance: float) -> None:
    if abs(now - ts) > tolerance:
        raise SignatureError("timestamp_out_of_window", f"timestamp is {now - ts:.0f} s from now (tolerance {tolerance:.0f} s)")


def sign_standard(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for a body (what the billing system sends)."""
    digest = hmac.new(decode_standard_secret(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _offered_signatures(raw_sig: str) -> list[bytes]:
    """The v1 signatures of a ``webhook-signature`` header: ``version,base64`` entries separated by single spaces.

    As strict as the reference package, which refuses the whole header when an entry is not ``version,value``
    (tabs, double spaces, a bare value); other versions are skipped; a v1 value must be strict base64.
    """
    offered: list[bytes] = []
    for entry in raw_sig.split(" "):
        parts = entry.split(",")
        if len(parts) != 2 or not parts[0]:
            raise SignatureError("bad_signature", "webhook-signature is not a space-separated list of version,signature")
        version, value = parts
        if version != "v1":
            continue
        try:
            offered.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise SignatureError("bad_signature", "a v1 signature is not base64") from None
    return offered


def verify_standard(secrets: Iterable[SecretStr], headers: Mapping[str, str], body: bytes, *, now: float, tolerance: float) -> tuple[str, float]:
    """Check a Standard Webhooks request; returns ``(webhook-id, timestamp)`` or raises SignatureError."""
    msg_id = headers.get("webhook-id", "")
    raw_ts = headers.get("webhook-timestamp", "")
    raw_sig = headers.get("webhook-signature", "")
    if not (msg_id and raw_ts and raw_sig):
        raise SignatureError("missing_signature", "webhook-id, webhook-timestamp and webhook-signature are required")
    ts = _parse_timestamp(raw_ts)
    _check_window(ts, now, tolerance)
    offered = _offered_signatures(raw_sig)
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


def data_id_forms(data_id: str) -> tuple[str, ...]:
    """The forms of ``data.id`` a genuine signature may cover.

    Mercado Pago's documentation says to lowercase an alphanumeric ``data.id``; its SDKs stopped doing so in June
    2026 (mercadopago/sdk-python#118 and the same change in every SDK: "MercadoPago signs webhook notifications
    using the original casing of data.id"), and sdk-go's documentation still says lowercase. Both forms are
    HMACs under our secret, so accepting either gives a forger nothing; the id is then used exactly as received.
    """
    lowered = data_id.lower()
    return (data_id, lowered) if data_id.isalnum() and lowered != data_id else (data_id,)


def mercadopago_manifest(data_id: str | None, request_id: str | None, ts: str) -> str:
    """``id:<data.id>;request-id:<x-request-id>;ts:<ts>;``, leaving out a part whose value is absent (as
    Mercado Pago's documentation says for a missing ``data.id`` or ``x-request-id``)."""
    parts = []
    if data_id:
        parts.append(f"id:{data_id};")
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


@dataclass(frozen=True)
class MercadoPagoVerified:
    """What a Mercado Pago signature covers, and nothing else: the only inputs an event may be keyed on."""

    notified_at: float  # epoch seconds
    data_id: str | None  # in the form the signature covers (see data_id_forms)
    request_id: str | None
    ts: str  # the signed ts, as sent
    received_data_id: str | None = None  # as received in the query string (what the payment is looked up by)

    @property
    def event_id(self) -> str:
        """The deduplication key, built from signed values only.

        The body's ``id`` is not signed: keyed on it, one captured notification replayed with new body ids made
        new events, and a replay under a future id made the genuine one a "duplicate". ``data.id`` with
        ``x-request-id`` names one delivery of one resource (Mercado Pago documents both as the signed
        identity of a notification); without a request id the signed ``ts`` stands in for it.
        """
        parts = [f"id:{self.data_id};"] if self.data_id else []
        parts.append(f"request-id:{self.request_id};" if self.request_id else f"ts:{self.ts};")
        return "".join(parts)


_MAX_ID = 200


def verify_mercadopago(
    secrets: Iterable[SecretStr], x_signature: str, request_id: str, data_id: str | None, *, now: float, window: float
) -> MercadoPagoVerified:
    """Check a Mercado Pago notification; returns what its signature covers or raises SignatureError.

    ``x-request-id`` may be absent: Mercado Pago's documentation says to leave its part out of the manifest then.
    """
    if not x_signature:
        raise SignatureError("missing_signature", "x-signature header is missing")
    if len(request_id) > _MAX_ID or (data_id is not None and len(data_id) > _MAX_ID):
        raise SignatureError("bad_signature", f"data.id and x-request-id must be at most {_MAX_ID} characters")
    signature = parse_x_signature(x_signature)
    ts = mercadopago_ts_seconds(_parse_timestamp(signature.ts))
    _check_window(ts, now, window)
    offered = [v.lower().encode() for v in signature.v1]
    keys = [s.get_secret_value().encode() for s in secrets]
    for form in data_id_forms(data_id) if data_id else (None,):
        manifest = mercadopago_manifest(form, request_id, signature.ts).encode()
        if _any_match([hmac.new(key, manifest, hashlib.sha256).hexdigest().encode() for key in keys], offered):
            # The form that was signed is the event's identity: when the lowercased id was signed, every casing
            # of it in the URL verifies, and all of them must be the same event (not one event per casing).
            return MercadoPagoVerified(ts, form, request_id or None, signature.ts, received_data_id=data_id)
    raise SignatureError("bad_signature", "no signature matches an active secret")
