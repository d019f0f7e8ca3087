"""What a verified body means: its schema, and which job (if any) each event type enqueues.

Pure functions, no I/O: the HTTP layer verifies and reads, the store writes, this module decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._signatures import MercadoPagoVerified

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
    """The body is JSON but not an event we can accept; the message says which field (never the body).

    ``reason`` is the stable label of the 400 (metrics, logs, the response body).
    """

    def __init__(self, detail: str, reason: str = "schema") -> None:
        super().__init__(detail)
        self.reason = reason


# ISO 4217 currency codes in use (2026), without the codes that are no money one could pay with: precious metals
# (XAU, XAG, XPD, XPT), bond-market and fund units (XBA-XBD, XDR, XSU, XUA) and the test/none codes (XTS, XXX).
CURRENCIES = frozenset(
    """AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD CAD CDF
    CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF
    GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL
    LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN
    PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD
    TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG ZWL""".split()  # noqa: SIM905
)
# A positive amount as a decimal string, at most 2 decimals and 12 integer digits (numeric(14, 2) in the table).
_AMOUNT = re.compile(r"(0|[1-9][0-9]{0,11})(\.[0-9]{1,2})?")


def parse_amount(value: Any) -> Decimal:
    if not isinstance(value, str) or not _AMOUNT.fullmatch(value):
        raise SchemaError("data.amount: must be a decimal string such as \"1500.00\" (at most 2 decimals)", "invalid_amount")
    amount = Decimal(value)
    if amount <= 0:
        raise SchemaError("data.amount: must be greater than 0", "invalid_amount")
    return amount


def parse_currency(value: Any) -> str:
    if not isinstance(value, str) or value not in CURRENCIES:
        raise SchemaError("data.currency: must be an ISO 4217 code such as \"ARS\"", "invalid_currency")
    return value


@dataclass(frozen=True)
class TimeWindow:
    """How far an event's own time may lie from the time it was received (configurable; see the settings)."""

    max_age: timedelta = timedelta(days=7)
    max_ahead: timedelta = timedelta(minutes=5)

    def check(self, field_name: str, event_at: datetime, received_at: datetime) -> None:
        # The worker orders a service's events by this time: one far-future event would make every later suspend
        # or restore of that service "stale", so it is refused before anything is stored.
        if event_at < received_at - self.max_age or event_at > received_at + self.max_ahead:
            raise SchemaError(
                f"{field_name}: must lie between {self.max_age} before and {self.max_ahead} after the time of receipt",
                "event_time_out_of_window",
            )


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow")

    service_id: str = Field(min_length=1, max_length=200)
    payment_id: str | None = Field(default=None, min_length=1, max_length=200)
    amount: Any = None
    currency: Any = None

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
    service_id: str | None = None  # for a device job, its existence decides ``unknown_service``
    payment_id: str | None = None
    amount: Decimal | None = None
    currency: str | None = None


def _errors(exc: ValidationError) -> str:
    # Field locations and messages only: pydantic's default text would echo the offending input values.
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors(include_input=False))


def _payment_fields(event_type: str, data: _Data) -> tuple[Decimal | None, str | None]:
    required = event_type in PAYMENT_TYPES
    if required and data.payment_id is None:
        raise SchemaError(f"data.payment_id: required for {event_type}")
    amount = parse_amount(data.amount) if required or data.amount is not None else None
    currency = parse_currency(data.currency) if required or data.currency is not None else None
    return amount, currency


def standard_event(event_id: str, body: Any, *, received_at: datetime, window: TimeWindow) -> Event:
    """A Standard Webhooks event from the billing system (``body`` already parsed from JSON)."""
    if not 1 <= len(event_id) <= 200:
        raise SchemaError("webhook-id: must be 1 to 200 characters")
    if not isinstance(body, dict):
        raise SchemaError("body: must be a JSON object")
    try:
        parsed = _StandardEvent.model_validate(body)
    except ValidationError as exc:
        raise SchemaError(_errors(exc)) from None
    window.check("timestamp", parsed.timestamp, received_at)
    if parsed.type not in STANDARD_TYPES:
        return Event("standard", event_id, parsed.type, parsed.timestamp, body, None, known=False)
    try:
        data = _Data.model_validate(parsed.data)
    except ValidationError as exc:
        raise SchemaError("data." + _errors(exc)) from None
    amount, currency = _payment_fields(parsed.type, data)
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
                # Who asked, for the service's history (CONTRACT.md; today's worker ignores extra fields).
                "source": "webhook",
                "actor": "standard",
                "provider": "standard",
                "event_id": event_id,
                "payment_id": data.payment_id,
            },
        )
    return Event(
        "standard", event_id, parsed.type, parsed.timestamp, body, job, known=True,
        service_id=data.service_id, payment_id=data.payment_id, amount=amount, currency=currency,
    )


class _MercadoPagoBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | int | None = None  # not signed: kept in the payload, never used as the event's identity
    type: str | None = Field(default=None, max_length=100)
    action: str | None = Field(default=None, max_length=100)
    date_created: AwareDatetime | None = None
    data: dict[str, Any] | None = None


def mercadopago_event(
    verified: MercadoPagoVerified, query_type: str | None, body: Any, *, received_at: datetime, window: TimeWindow
) -> Event:
    """A Mercado Pago notification. Only ``data.id``, ``x-request-id`` and ``ts`` are signed: the event's identity
    and the job use nothing else from the request (the payment's real state is fetched from the API by the
    ``payments.sync`` job); the body is checked for consistency and kept for the record."""
    if not isinstance(body, dict):
        raise SchemaError("body: must be a JSON object")
    try:
        parsed = _MercadoPagoBody.model_validate(body)
    except ValidationError as exc:
        raise SchemaError(_errors(exc)) from None
    if parsed.date_created is not None:
        window.check("date_created", parsed.date_created, received_at)
    data_id = verified.data_id
    kind = parsed.type or query_type or ""
    body_data_id = None if parsed.data is None else parsed.data.get("id")
    if data_id and body_data_id is not None and str(body_data_id).lower() != data_id.lower():
        raise SchemaError("data.id: differs from the data.id of the query string")
    event_id = verified.event_id
    if kind != "payment":
        return Event("mercadopago", event_id, kind[:100] or "unknown", parsed.date_created, body, None, known=False)
    if not data_id:
        raise SchemaError("data.id: a payment notification needs data.id in the query string")
    # Looked up as received: an Orders API id is upper case, whichever form the signature covered.
    payment_id = verified.received_data_id or data_id
    job = Job(
        PAYMENT_SYNC,
        {
            "type": "payments.sync",
            "provider": "mercadopago",
            "payment_id": payment_id,
            "notified_at": datetime.fromtimestamp(verified.notified_at, UTC).isoformat(),
            "source": "webhook",
            "actor": "mercadopago",
            "event_id": event_id,
        },
    )
    action = parsed.action if parsed.action and parsed.action.startswith("payment.") else "payment"
    return Event("mercadopago", event_id, action, parsed.date_created, body, job, known=True, payment_id=payment_id)
