"""The ``payment_sync`` jobs (``payments.sync``): ask the provider for the payment's real state, and when it is
approved for one of our customer services, enqueue that service's activation.

A notification is only a hint (anyone can send one); the payment's state comes from the provider's API. The
activation carries the payment's approval time as its business time, so it orders correctly against
suspensions, and a repeated sync only repeats an idempotent activation.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx
import psycopg
from pydantic import BaseModel, ConfigDict, Field

from pg_worker import AsyncProducer, Job, PermanentFailure

from . import _sql
from .actions import ACTIVATE, action_message
from .metrics import PAYMENT_SYNCS
from .settings import DEVICE_ACTIONS, WlSettings

logger = logging.getLogger(__name__)


class PaymentSync(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["payments.sync"]
    provider: Literal["mercadopago"]
    payment_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    notified_at: datetime


class ProviderUnavailable(Exception):
    """The provider's API failed in a way worth retrying (timeout, connection, 5xx, 429)."""


class PaymentSyncHandler:
    def __init__(self, conninfo: str, settings: WlSettings) -> None:
        self.conninfo = conninfo
        self.settings = settings

    async def handle(self, job: Job[PaymentSync]) -> None:
        sync = job.payload
        context = {"provider": sync.provider, "payment_id": sync.payment_id, "attempt": job.attempt, "msg_id": job.msg_id}
        try:
            payment = await self._fetch(sync.payment_id)
        except ProviderUnavailable as exc:
            PAYMENT_SYNCS.labels(sync.provider, "transient").inc()
            logger.warning("payment_fetch_failed", extra={"event": "payment_fetch_failed", **context, "error": str(exc)})
            raise
        except PermanentFailure as exc:
            PAYMENT_SYNCS.labels(sync.provider, "permanent").inc()
            logger.error("payment_fetch_rejected", extra={"event": "payment_fetch_rejected", **context, "error": str(exc)})
            raise
        status = payment.get("status")
        if status != "approved":
            PAYMENT_SYNCS.labels(sync.provider, "not_approved").inc()
            logger.info("payment_not_approved", extra={"event": "payment_not_approved", **context, "status": status})
            return
        service_id = str(payment.get("external_reference") or "")
        approved_at = self._approved_at(payment, context)
        async with await psycopg.AsyncConnection.connect(self.conninfo, connect_timeout=10) as conn, conn.transaction():
            cur = await conn.execute(_sql.SERVICE_EXISTS, (service_id,))
            if not service_id or await cur.fetchone() is None:
                PAYMENT_SYNCS.labels(sync.provider, "unknown_service").inc()
                logger.warning("payment_unknown_service", extra={"event": "payment_unknown_service", **context, "external_reference": service_id})
                return
            message = action_message(
                ACTIVATE, service_id, approved_at, f"mercadopago payment {sync.payment_id}",
                source="payment_sync", actor=sync.provider, provider=sync.provider, payment_id=sync.payment_id,
            )  # fmt: skip
            msg_id = await AsyncProducer().enqueue(DEVICE_ACTIONS, message, conn=conn)
        PAYMENT_SYNCS.labels(sync.provider, "activated").inc()
        logger.info("payment_activation_enqueued", extra={"event": "payment_activation_enqueued", **context, "service_id": service_id, "action_msg_id": msg_id})

    def _approved_at(self, payment: dict[str, Any], context: dict[str, Any]) -> datetime:
        raw = payment.get("date_approved")
        try:
            value = datetime.fromisoformat(str(raw))
        except ValueError:
            value = None
        if value is None or value.tzinfo is None:
            PAYMENT_SYNCS.labels(context["provider"], "permanent").inc()
            raise PermanentFailure(f"approved payment {context['payment_id']} has no valid date_approved: {raw!r}")
        return value

    async def _fetch(self, payment_id: str) -> dict[str, Any]:
        token = self.settings.mercadopago_access_token
        if token is None or not token.get_secret_value():
            raise PermanentFailure("MERCADOPAGO_ACCESS_TOKEN is not set")
        url = f"{self.settings.mercadopago_api_base_url}/v1/payments/{quote(payment_id, safe='')}"
        headers = {"Authorization": f"Bearer {token.get_secret_value()}", "Accept": "application/json"}
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(self.settings.http_read_timeout, connect=self.settings.http_connect_timeout)) as client:
                response = await client.get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise ProviderUnavailable(f"provider answered HTTP {response.status_code}")
        if response.status_code in (401, 403):
            raise PermanentFailure(f"provider refused the access token (HTTP {response.status_code})")
        if response.status_code == 404:
            raise PermanentFailure(f"provider has no payment {payment_id}")
        if response.status_code != 200:
            raise PermanentFailure(f"provider answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise ProviderUnavailable("provider answered with invalid JSON") from exc
        if not isinstance(body, dict):
            raise PermanentFailure("provider answered with something other than a payment object")
        return body
