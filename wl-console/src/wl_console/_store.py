"""The console's reads and writes, as functions over a psycopg connection (SQL in ``_sql.py``).

Writes never touch desired state: an operator's activate/deactivate/refresh/test is a ``device_actions`` job
(``source`` "console", ``actor`` the user), enqueued in the same transaction as its history and audit rows, so
either all three exist or none. The worker records what it then does.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

import pg_worker

from . import _sql
from .accounts import audit

AConn = psycopg.AsyncConnection[Any]

ACTIONS = {"suspend": ("service.deactivate", "suspended"), "activate": ("service.activate", "active")}
MAX_REASON = 1000


class InputError(ValueError):
    """Bad input from a form or query string: shown on the page, nothing changed."""


class DeadLettersGone(Exception):
    """Some of the dead letters asked for are gone (replayed or purged meanwhile): the transaction rolled back."""

    def __init__(self, moved: Moved) -> None:
        super().__init__(f"no such dead letter(s): {', '.join(map(str, moved.missing))}; nothing changed")


@dataclass(frozen=True)
class Customer:
    service_id: str
    device: str
    method: str
    target: str
    desired_state: str
    desired_generation: int | None
    applied_state: str | None
    applied_generation: int | None
    applied_at: datetime | None
    observed_state: str | None
    observed_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    desired_reason: str | None
    desired_source: str | None
    desired_actor: str | None
    desired_changed_at: datetime | None
    diverged: bool
    pending: int = 0


@dataclass(frozen=True)
class CustomerQuery:
    q: str = ""
    device: str = ""
    suspended: bool = False
    diverged: bool = False
    errors: bool = False
    pending: bool = False
    after: str = ""

    def params(self) -> dict[str, str]:
        """The query string of this search (for the next-page link), without empty values."""
        values = {"q": self.q, "device": self.device, "after": self.after}
        flags = {name: "1" for name in ("suspended", "diverged", "errors", "pending") if getattr(self, name)}
        return {**{k: v for k, v in values.items() if v}, **flags}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def _exists(conn: AConn, regclass: str) -> bool:
    cur = await conn.execute(_sql.TABLE_EXISTS, (regclass,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def search_customers(conn: AConn, query: CustomerQuery, limit: int) -> tuple[list[Customer], str | None]:
    """One page of customers and the ``after`` value of the next page (None on the last)."""
    filters: set[str] = set()
    params: dict[str, Any] = {"limit": limit + 1}
    q = query.q.strip()
    if q:
        if "/" in q:
            try:
                params["net"] = str(ipaddress.ip_network(q, strict=False))
            except ValueError:
                raise InputError(f"{q!r} is not an IP prefix (like 10.20.5.0/24)") from None
            filters.add("net")
        elif _is_ip(q):
            params["q"] = str(ipaddress.ip_address(q))
            filters.add("ip")
        else:
            params["q"], params["prefix"] = q, _escape_like(q) + "%"
            filters.add("q")
    for name in ("device", "after"):
        value = getattr(query, name).strip()
        if value:
            params[name] = value
            filters.add(name)
    filters |= {name for name in ("suspended", "diverged", "errors") if getattr(query, name)}
    queue_exists = await _exists(conn, _sql.qualified(_sql.DEVICE_ACTIONS))
    if query.pending:
        filters.add("pending" if queue_exists else "no_pending")
    cur = await conn.execute(_sql.list_customers(filters), params)
    rows = [Customer(*row) for row in await cur.fetchall()]
    next_after = rows[limit - 1].service_id if len(rows) > limit else None
    rows = rows[:limit]
    if rows and queue_exists:
        cur = await conn.execute(_sql.PENDING_COUNTS, ([r.service_id for r in rows],))
        counts = {str(k): int(v) for k, v in await cur.fetchall()}
        rows = [Customer(**{**r.__dict__, "pending": counts.get(r.service_id, 0)}) for r in rows]
    return rows, next_after


async def get_customer(conn: AConn, service_id: str) -> Customer | None:
    cur = await conn.execute(_sql.GET_CUSTOMER, (service_id,))
    row = await cur.fetchone()
    return Customer(*row) if row else None


@dataclass(frozen=True)
class CustomerPage:
    customer: Customer
    history: list[dict[str, Any]]
    pending: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    payments: list[dict[str, Any]]
    history_before: int | None = None


_HISTORY_KEYS = ("id", "at", "kind", "source", "actor", "reason", "event_id", "payment_id", "state", "outcome", "error_class", "duration_ms", "detail")
_PAYMENT_KEYS = ("id", "provider", "event_id", "type", "received_at", "outcome", "service_id", "payment_id", "amount", "currency")


async def customer_page(conn: AConn, customer: Customer, *, before: int | None, limit: int = 100) -> CustomerPage:
    history: list[dict[str, Any]] = []
    if await _exists(conn, "wl.service_history"):
        cur = await conn.execute(_sql.HISTORY, {"service_id": customer.service_id, "before": before, "limit": limit + 1})
        history = [dict(zip(_HISTORY_KEYS, row, strict=True)) for row in await cur.fetchall()]
    more = history[limit - 1]["id"] if len(history) > limit else None
    pending: list[dict[str, Any]] = []
    if await _exists(conn, _sql.qualified(_sql.DEVICE_ACTIONS)):
        cur = await conn.execute(_sql.PENDING_FOR_SERVICE, (customer.service_id,))
        pending = [dict(zip(("msg_id", "enqueued_at", "vt", "read_ct", "message"), row, strict=True)) for row in await cur.fetchall()]
    dead: list[dict[str, Any]] = []
    if await _exists(conn, _sql.qualified(pg_worker.dlq_name(_sql.DEVICE_ACTIONS))):
        cur = await conn.execute(_sql.DEAD_FOR_SERVICE, (customer.service_id,))
        dead = [dead_letter(_sql.DEVICE_ACTIONS, *row) for row in await cur.fetchall()]
    payments: list[dict[str, Any]] = []
    if await _exists(conn, "webhook.events"):
        cur = await conn.execute(_sql.PAYMENTS_FOR_SERVICE, (customer.service_id,))
        payments = [dict(zip(_PAYMENT_KEYS, row, strict=True)) for row in await cur.fetchall()]
    return CustomerPage(customer, history[:limit], pending, dead, payments, more)


def validate_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise InputError("a reason is required")
    if len(reason) > MAX_REASON:
        raise InputError(f"the reason must be at most {MAX_REASON} characters")
    return reason


async def enqueue_service_action(conn: AConn, customer: Customer, action: str, reason: str, actor: str, *, now: datetime) -> int:
    """Enqueue activate/deactivate for the customer, with its history and audit rows, in one transaction."""
    if action not in ACTIONS:
        raise InputError("the action must be suspend or activate")
    job_type, state = ACTIONS[action]
    reason = validate_reason(reason)
    message = {"type": job_type, "service_id": customer.service_id, "event_at": now.isoformat(), "reason": reason,
               "source": "console", "actor": actor}
    async with conn.transaction():
        msg_id = await pg_worker.AsyncProducer().enqueue(_sql.DEVICE_ACTIONS, message, conn=conn)
        detail = {"action": job_type, "msg_id": msg_id, "old_desired": customer.desired_state, "new_desired": state}
        await conn.execute(_sql.INSERT_HISTORY, {"service_id": customer.service_id, "actor": actor, "reason": reason, "state": state,
                                                 "event_id": str(msg_id), "detail": Jsonb(detail)})
        await audit(conn, actor, job_type, customer.service_id, {**detail, "reason": reason})
    return msg_id


async def enqueue_refresh(conn: AConn, customer: Customer, actor: str) -> int:
    message = {"type": "service.refresh", "service_id": customer.service_id, "source": "console", "actor": actor}
    async with conn.transaction():
        msg_id = await pg_worker.AsyncProducer().enqueue(_sql.DEVICE_ACTIONS, message, conn=conn)
        detail = {"action": "service.refresh", "msg_id": msg_id}
        await conn.execute(_sql.INSERT_HISTORY, {"service_id": customer.service_id, "actor": actor, "reason": "refresh from router",
                                                 "state": None, "event_id": str(msg_id), "detail": Jsonb(detail)})
        await audit(conn, actor, "service.refresh", customer.service_id, detail)
    return msg_id


# -- routers -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Router:
    name: str
    driver: str
    host: str
    port: int | None
    scheme: str
    last_contact_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    services: int
    diverged: int
    suspended: int
    pending: int = 0


async def list_routers(conn: AConn, device: str | None = None) -> list[Router]:
    cur = await conn.execute(_sql.LIST_ROUTERS, {"device": device})
    routers = [Router(*row) for row in await cur.fetchall()]
    if routers and await _exists(conn, _sql.qualified(_sql.DEVICE_ACTIONS)):
        cur = await conn.execute(_sql.PENDING_PER_ROUTER)
        pending = {str(k): int(v) for k, v in await cur.fetchall() if k is not None}
        routers = [Router(**{**r.__dict__, "pending": pending.get(r.name, 0)}) for r in routers]
    return routers


async def device_tests(conn: AConn, device: str) -> list[dict[str, Any]]:
    if not await _exists(conn, "wl.device_tests"):
        return []
    cur = await conn.execute(_sql.DEVICE_TESTS, (device,))
    return [dict(zip(("request_id", "at", "ok", "message"), row, strict=True)) for row in await cur.fetchall()]


async def enqueue_device_test(conn: AConn, device: str, actor: str) -> str:
    request_id = uuid.uuid4().hex
    message = {"type": "device.test", "device": device, "source": "console", "actor": actor, "request_id": request_id}
    async with conn.transaction():
        msg_id = await pg_worker.AsyncProducer().enqueue(_sql.DEVICE_ACTIONS, message, conn=conn)
        await audit(conn, actor, "device.test", device, {"msg_id": msg_id, "request_id": request_id})
    return request_id


# -- payments ------------------------------------------------------------------------------------------------

OUTCOMES = ("accepted", "duplicate", "stored", "ignored", "unknown_service")


@dataclass(frozen=True)
class PaymentQuery:
    q: str = ""
    outcome: str = ""
    service_id: str = ""
    before: int | None = None


async def list_payments(conn: AConn, query: PaymentQuery, limit: int) -> tuple[list[dict[str, Any]], int | None, bool]:
    """A page of webhook events, newest first; the next page's ``before``; whether the table exists at all."""
    if not await _exists(conn, "webhook.events"):
        return [], None, False
    filters: set[str] = set()
    params: dict[str, Any] = {"limit": limit + 1}
    for name in ("q", "outcome", "service_id"):
        value = getattr(query, name).strip()
        if value:
            params[name] = value
            filters.add(name)
    if query.before is not None:
        params["before"] = query.before
        filters.add("before")
    cur = await conn.execute(_sql.list_payments(filters), params)
    rows = [dict(zip(_PAYMENT_KEYS, row, strict=True)) for row in await cur.fetchall()]
    more = rows[limit - 1]["id"] if len(rows) > limit else None
    return rows[:limit], more, True


# -- queues and dead letters ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueueStats:
    queue: str
    depth: int
    ready: int
    in_flight: int
    retry_waiting: int
    scheduled: int
    oldest_age: float | None
    dead_letters: int | None  # None: the queue has no dead-letter queue

    @property
    def capped(self) -> bool:
        return self.depth > _sql.STATS_CAP


async def queue_names(conn: AConn) -> list[str]:
    cur = await conn.execute(_sql.PGMQ_EXISTS)
    row = await cur.fetchone()
    if not row or not row[0]:
        return []
    cur = await conn.execute(_sql.LIST_QUEUES)
    return [str(r[0]) for r in await cur.fetchall()]


async def queue_stats(conn: AConn) -> list[QueueStats]:
    names = await queue_names(conn)
    stats = []
    for queue in names:
        if queue.endswith(_sql.DLQ_SUFFIX):
            continue
        try:
            statement = _sql.queue_stats(queue)
        except pg_worker.InvalidQueueName:
            continue  # a queue made by someone else under a name pg-worker does not accept: not ours to show
        cur = await conn.execute(statement)
        row = await cur.fetchone()
        assert row is not None
        dead = None
        if queue + _sql.DLQ_SUFFIX in names:
            cur = await conn.execute(_sql.dlq_count(queue + _sql.DLQ_SUFFIX))
            drow = await cur.fetchone()
            dead = int(drow[0]) if drow else 0
        stats.append(QueueStats(queue, int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]), row[5], dead))
    return stats


async def device_exists(conn: AConn, name: str) -> bool:
    cur = await conn.execute(_sql.DEVICE_EXISTS, (name,))
    return await cur.fetchone() is not None


async def resolve_dlq(conn: AConn, queue: str) -> str | None:
    """The dead-letter queue of ``queue`` if both exist (None: 404)."""
    try:
        dlq = pg_worker.dlq_name(queue)
    except pg_worker.InvalidQueueName:
        return None
    names = await queue_names(conn)
    return dlq if queue in names and dlq in names else None


def dead_letter(queue: str, dlq_id: int, dead_since: datetime, body: dict[str, Any]) -> dict[str, Any]:
    """A dead letter as the pages show it: pg-worker's DLQ body (``message``, ``error``, ``attempts``, ...)."""
    message = body.get("message") if isinstance(body.get("message"), dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    assert isinstance(message, dict) and isinstance(error, dict)
    return {
        "queue": queue, "dlq_id": dlq_id, "dead_since": dead_since, "type": message.get("type"), "service_id": message.get("service_id"),
        "device": message.get("device"), "attempts": body.get("attempts"), "error_reason": error.get("reason"),
        "error_type": error.get("type"), "error_message": error.get("message"), "traceback": error.get("traceback"),
        "message": message, "headers": body.get("headers"), "original_msg_id": body.get("msg_id"), "failed_at": body.get("failed_at"),
    }


@dataclass(frozen=True)
class DeadLetterQuery:
    type: str = ""
    service_id: str = ""
    after: int | None = None


async def list_dead_letters(conn: AConn, queue: str, dlq: str, query: DeadLetterQuery, limit: int) -> tuple[list[dict[str, Any]], int | None]:
    params = {"after": query.after, "type": query.type or None, "service_id": query.service_id or None, "limit": limit + 1}
    cur = await conn.execute(_sql.dlq_list(dlq), params)
    rows = [dead_letter(queue, *row) for row in await cur.fetchall()]
    more = rows[limit - 1]["dlq_id"] if len(rows) > limit else None
    return rows[:limit], more


async def get_dead_letter(conn: AConn, queue: str, dlq: str, dlq_id: int) -> dict[str, Any] | None:
    cur = await conn.execute(_sql.dlq_show(dlq), (dlq_id,))
    row = await cur.fetchone()
    return dead_letter(queue, *row) if row else None


@dataclass
class Moved:
    ids: list[tuple[int, int | None]] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)


async def _history_for_moved(conn: AConn, history: bool, message: Any, actor: str, action: str, detail: dict[str, Any]) -> None:
    """Note a replayed or purged dead letter in its service's history (``history``: wl.service_history exists)."""
    service_id = message.get("service_id") if isinstance(message, dict) else None
    if isinstance(service_id, str) and service_id and history:
        await conn.execute(_sql.INSERT_HISTORY, {"service_id": service_id, "actor": actor, "reason": f"dead letter {action}",
                                                 "state": None, "event_id": str(detail.get("dlq_id")), "detail": Jsonb({"action": action, **detail})})


async def replay_dead_letters(conn: AConn, queue: str, dlq: str, ids: list[int], actor: str) -> Moved:
    """All or nothing: if one id is gone (replayed or purged by someone else), nothing moves."""
    moved = Moved()
    async with conn.transaction():
        cur = await conn.execute(_sql.dlq_replay(dlq), {"ids": ids, "queue": queue})
        rows = await cur.fetchall()
        moved.missing = sorted(set(ids) - {int(r[0]) for r in rows})
        if moved.missing:
            raise DeadLettersGone(moved)
        history = await _exists(conn, "wl.service_history")  # once, not per letter (up to MAX_SELECTION)
        for dlq_id, new_id, message in rows:
            moved.ids.append((int(dlq_id), int(new_id)))
            detail = {"queue": queue, "dlq_id": int(dlq_id), "new_msg_id": int(new_id)}
            await _history_for_moved(conn, history, message, actor, "replayed", detail)
        await audit(conn, actor, "dead_letter.replay", queue, {"moved": moved.ids})
    return moved


async def purge_dead_letters(conn: AConn, queue: str, dlq: str, ids: list[int] | None, actor: str) -> Moved:
    """Delete the given dead letters (all of them with ``ids=None``); all or nothing as for replay."""
    moved = Moved()
    async with conn.transaction():
        if ids is None:
            cur = await conn.execute(_sql.dlq_purge_all(dlq))
        else:
            cur = await conn.execute(_sql.dlq_purge(dlq), {"ids": ids})
        rows = await cur.fetchall()
        if ids is not None:
            moved.missing = sorted(set(ids) - {int(r[0]) for r in rows})
            if moved.missing:
                raise DeadLettersGone(moved)
        history = await _exists(conn, "wl.service_history")
        for dlq_id, message in rows:
            moved.ids.append((int(dlq_id), None))
            await _history_for_moved(conn, history, message, actor, "purged", {"queue": queue, "dlq_id": int(dlq_id)})
        await audit(conn, actor, "dead_letter.purge", queue, {"purged": [i for i, _ in moved.ids], "messages": [r[1] for r in rows]})
    return moved
