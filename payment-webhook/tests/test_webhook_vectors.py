"""Standard Webhooks verification, case for case the reference package's own test suite (vendored as data in
data/standard_webhooks_vectors.json, origin and license in data/NOTICE.md): our verifier, the reference package
and our server over HTTP must agree on every case, and agree with the suite's expected outcome."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from math import floor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from payment_webhook import SignatureError, sign_standard, verify_standard
from webhook_fixtures import make_settings
from webhook_helpers import serve

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "standard_webhooks_vectors.json").read_text())
CASES = VECTORS["cases"]
MSG_ID: str = VECTORS["msg_id"]
PAYLOAD: str = VECTORS["payload"]


def _headers(case: dict[str, Any], now: float) -> dict[str, str]:
    ts = str(floor(now + case["timestamp_offset_seconds"]))
    key = base64.b64decode(case["signing_secret"])
    computed = "v1," + base64.b64encode(hmac.new(key, f"{MSG_ID}.{ts}.{PAYLOAD}".encode(), hashlib.sha256).digest()).decode()
    signature = " ".join(computed if s == "<computed>" else s for s in case["signature_list"]) if case["signature_list"] else computed
    headers = {"webhook-id": MSG_ID, "webhook-timestamp": ts, "webhook-signature": signature}
    if case["drop_header"]:
        del headers[case["drop_header"]]
    headers.update(case["set_headers"])
    return headers


def _ours(secret: str, headers: dict[str, str], now: float, body: str = PAYLOAD) -> bool:
    try:
        verify_standard((SecretStr(secret),), headers, body.encode(), now=now, tolerance=VECTORS["tolerance_seconds"])
    except SignatureError:
        return False
    return True


def _reference(secret: str, headers: dict[str, str], body: str = PAYLOAD) -> bool:
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except (WebhookVerificationError, ValueError):  # ValueError (binascii.Error too) on some malformed headers
        return False
    return True


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_every_case_of_the_reference_suite(case: dict[str, Any]) -> None:
    now = time.time()
    headers = _headers(case, now)
    assert _reference(case["verifier_secret"], headers) is case["valid"]
    assert _ours(case["verifier_secret"], headers, now) is case["valid"]


def test_the_reference_suites_signing_vector_byte_for_byte() -> None:
    for vector in VECTORS["sign_vectors"]:
        assert sign_standard(vector["secret"], vector["msg_id"], vector["timestamp"], vector["payload"].encode()) == vector["signature"]


@pytest.mark.parametrize("secret", VECTORS["empty_secrets"])
def test_an_empty_secret_is_refused_like_the_reference_does(secret: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        sign_standard(secret, MSG_ID, 1, b"{}")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda ts, sig: (ts + ".0", sig), id="fractional timestamp"),
        pytest.param(lambda ts, sig: ("+" + ts, sig), id="signed timestamp"),
        pytest.param(lambda ts, sig: (f"{int(ts) / 1e9:.9f}e9", sig), id="exponent timestamp"),
        pytest.param(lambda ts, sig: ("0" + ts, sig), id="leading zero"),
        pytest.param(lambda ts, sig: (ts, "v1,AAAA\t" + sig), id="tab-separated list"),
        pytest.param(lambda ts, sig: (ts, "v1,AAAA  " + sig), id="double space"),
        pytest.param(lambda ts, sig: (ts, "garbage " + sig), id="entry without a version"),
    ],
)
def test_headers_the_reference_refuses_are_refused(mutate: Any) -> None:
    """A sender that signs exactly the header it sends, in a form the reference package refuses."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    now = time.time()
    ts, signature_list = mutate(str(int(now)), "")
    signed = "v1," + base64.b64encode(
        hmac.new(base64.b64decode(secret[6:]), f"{MSG_ID}.{ts}.{PAYLOAD}".encode(), hashlib.sha256).digest()
    ).decode()
    headers = {"webhook-id": MSG_ID, "webhook-timestamp": ts, "webhook-signature": signature_list + signed}
    assert _reference(secret, headers) is False
    assert _ours(secret, headers, now) is False


def test_every_case_through_the_server(webhook_db: str) -> None:
    """Over HTTP with the reference suite's secrets configured (those our start-up policy allows: 24 bytes and
    more): a case the suite calls valid passes the signature (then 400, its body is no event), others are 401."""
    allowed = sorted({c["verifier_secret"] for c in CASES if len(base64.b64decode(c["verifier_secret"].removeprefix("whsec_") + "==")) >= 24})
    with serve(make_settings(standard_secrets=",".join(allowed)), webhook_db) as server:
        checked = 0
        for case in CASES:
            if case["verifier_secret"] not in allowed:
                continue
            headers = _headers(case, time.time())
            response = httpx.post(server.base_url + "/webhooks/standard", content=PAYLOAD.encode(), headers=headers, timeout=10)
            expected = (400, "schema") if case["valid"] else (401, response.json().get("reason"))
            assert (response.status_code, response.json()["reason"]) == expected, case["name"]
            checked += 1
        assert checked >= len(CASES) - 1
