"""The append-only history of each customer service (``wl.service_history``): every accepted or stale event,
desired change, router action and read, dead letter and operator change, with who, why and the outcome.

The CLI and the console read it (``list_history``); the worker writes it (``record``). Retention:
``prune(conn, older_than_days)``, run by ``wl-workers history prune`` and by the periodic reconcile task.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from . import _sql

COLUMNS = (
    "id", "service_id", "at", "kind", "source", "actor", "reason", "event_id", "payment_id", "state", "outcome",
    "error_class", "duration_ms", "detail",
)  # fmt: skip
KINDS = (
    "event_accepted", "event_stale", "desired_changed", "router_action", "router_read", "dead_letter",
    "operator", "service_added", "service_removed", "service_moved", "service_updated",
)  # fmt: skip


async def record(
    conn: psycopg.AsyncConnection[Any],
    service_id: str,
    kind: str,
    *,
    source: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    event_id: str | None = None,
    payment_id: str | None = None,
    state: str | None = None,
    outcome: str | None = None,
    error_class: str | None = None,
    duration_ms: float | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one row (in the caller's transaction, if it has one)."""
    if kind not in KINDS:
        raise ValueError(f"unknown history kind {kind!r}")
    params = {
        "service_id": service_id, "kind": kind, "source": source, "actor": actor, "reason": reason,
        "event_id": event_id, "payment_id": payment_id, "state": state, "outcome": outcome,
        "error_class": error_class, "duration_ms": duration_ms, "detail": Jsonb(detail or {}),
    }  # fmt: skip
    await conn.execute(_sql.INSERT_HISTORY, params)


async def list_history(conn: psycopg.AsyncConnection[Any], service_id: str, *, limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
    """The newest rows first; page with ``before_id`` = the smallest id of the previous page."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_sql.LIST_HISTORY, {"service_id": service_id, "limit": limit, "before_id": before_id})
        return list(await cur.fetchall())


async def prune(conn: psycopg.AsyncConnection[Any], older_than_days: float) -> int:
    """Delete rows older than that many days; returns how many went."""
    if older_than_days <= 0:
        raise ValueError("older_than_days must be > 0")
    cur = await conn.execute(_sql.PRUNE_HISTORY, {"days": older_than_days})
    return cur.rowcount


def event_key(event_id: str | None, msg_id: int | None) -> str | None:
    """The id a history row carries for an event: the producer's id, else the queue message's."""
    return event_id or (f"msg:{msg_id}" if msg_id is not None else None)


__all__ = ["COLUMNS", "KINDS", "event_key", "list_history", "prune", "record"]
