"""What a verified body means: its schema, and which job (if any) each event type enqueues.

Pure functions, no I/O: the HTTP layer verifies and reads, the store writes, this module decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._signatures import normalize_data_id

DEVICE_ACTIONS = "device_actions"
PAYMENT_SYNC = "payment_sync"

ACTIVATE = "service.activate"
DEACTIVATE = "service.deactivate"

# Billing event type -> device job type (None: stored and counted, nothing enqueued).
STANDARD_TYPES: dict[str, str | None] = {
    "payment.approved": ACTIVATE,
    "service.restore": ACTIVATE,
    "service.suspend": DEACTIVATE,
    # Billing sends service.suspend itself when a refund should cut the service.
    "payment.refunded": None,
}
PAYMENT_TYPES = frozenset({"payment.approved", "payment.refunded"})


class SchemaError(ValueError):
    """The body is JSON but not an event we can accept; the message says which field (never the body)."""


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow")

    service_id: str = Field(min_length=1, max_length=200)
    payment_id: str | None = Field(default=None, min_length=1, max_length=200)
    amount: float | int | str | None = None
    currency: str | None = Field(default=None, max_length=10)

    @field_validator("service_id", "payment_id", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        # Billing systems send numeric ids as numbers now and then; the contract carries text.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class _StandardEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(min_length=1, max_length=100)
    timestamp: AwareDatetime
    data: dict[str, Any]


@dataclass(frozen=True)
class Job:
    queue: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Event:
    """A verified event, ready to be stored (and its job enqueued) in one transaction."""

    provider: str
    event_id: str
    type: str
    event_at: datetime | None
    payload: dict[str, Any]
    job: Job | None
    known: bool


def _errors(exc: ValidationError) -> str:
    # Field locations and messages only: pydantic's default text would echo the offending input values.
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors(include_input=False))


def standard_event(event_id: str, body: Any) -> Event:
    """A Standard Webhooks event from the billing system (``body`` already parsed from JSON)."""
    if not 1 <= len(event_id) <= 200:
        raise SchemaError("webhook-id: must be 1 to 200 characters")
    if not isinstance(body, dict):
        raise SchemaError("body: must be a JSON object")
    try:
        parsed = _StandardEvent.model_validate(body)
    except ValidationError as exc:
        raise SchemaError(_errors(exc)) from None
    if parsed.type not in STANDARD_TYPES:
        return Event("standard", event_id, parsed.type, parsed.timestamp, body, None, known=False)
    try:
        data = _Data.model_validate(parsed.data)
    except ValidationError as exc:
        raise SchemaError("data." + _errors(exc)) from None
    if parsed.type in PAYMENT_TYPES and data.payment_id is None:
        raise SchemaError(f"data.payment_id: required for {parsed.type}")
    job_type = STANDARD_TYPES[parsed.type]
    job = None
    if job_type is not None:
        what = f"payment {data.payment_id}" if data.payment_id else f"event {event_id}"
        job = Job(
            DEVICE_ACTIONS,
            {
                "type": job_type,
                "service_id": data.service_id,
                "event_at": parsed.timestamp.isoformat(),
                "reason": f"billing {parsed.type} ({what})",
            },
        )
    return Event("standard", event_id, parsed.type, parsed.timestamp, body, job, known=True)


class _MercadoPagoBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | int
    type: str | None = Field(default=None, max_length=100)
    action: str | None = Field(default=None, max_length=100)
    date_created: AwareDatetime | None = None
    data: dict[str, Any] | None = None


def mercadopago_event(data_id: str | None, query_type: str | None, notified_at: float, body: Any) -> Event:
    """A Mercado Pago notification. Only ``data.id`` (from the query string) is signed: the job uses nothing
    else from the request, and the payment's real state is fetched from the API by the ``payments.sync`` job."""
    if not isinstance(body, dict):
        raise SchemaError("body: must be a JSON object")
    try:
        parsed = _MercadoPagoBody.model_validate(body)
    except ValidationError as exc:
        raise SchemaError(_errors(exc)) from None
    event_id = str(parsed.id)
    if not event_id or len(event_id) > 200:
        raise SchemaError("id: must be 1 to 200 characters")
    kind = parsed.type or query_type or ""
    body_data_id = None if parsed.data is None else parsed.data.get("id")
    if data_id and body_data_id is not None and str(body_data_id).lower() != data_id.lower():
        raise SchemaError("data.id: differs from the data.id of the query string")
    if kind != "payment":
        return Event("mercadopago", event_id, kind or "unknown", parsed.date_created, body, None, known=False)
    if not data_id:
        raise SchemaError("data.id: a payment notification needs data.id in the query string")
    job = Job(
        PAYMENT_SYNC,
        {
            "type": "payments.sync",
            "provider": "mercadopago",
            "payment_id": normalize_data_id(data_id),
            "notified_at": datetime.fromtimestamp(notified_at, UTC).isoformat(),
        },
    )
    action = parsed.action if parsed.action and parsed.action.startswith("payment.") else "payment"
    return Event("mercadopago", event_id, action, parsed.date_created, body, job, known=True)
