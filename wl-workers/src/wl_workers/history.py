"""The per-service history (``wl.service_history``, append-only): what happened to a service and why.

Helper "wl" owns this module and its migration (0004_service_history.sql); this is the contract's interface, so
that the operator CLI can be written against it. The table outlives a removed service (no foreign key).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

RECORD = """
INSERT INTO wl.service_history (service_id, kind, source, actor, reason, event_id, payment_id, state, outcome,
                                error_class, duration_ms, detail)
VALUES (%(service_id)s, %(kind)s, %(source)s, %(actor)s, %(reason)s, %(event_id)s, %(payment_id)s, %(state)s,
        %(outcome)s, %(error_class)s, %(duration_ms)s, %(detail)s)
"""
LIST = """
SELECT id, service_id, at, kind, source, actor, reason, event_id, payment_id, state, outcome, error_class,
       duration_ms, detail
FROM wl.service_history
WHERE service_id = %(service_id)s AND (%(before_id)s::bigint IS NULL OR id < %(before_id)s::bigint)
ORDER BY at DESC, id DESC
LIMIT %(limit)s
"""
COLUMNS = ("id", "service_id", "at", "kind", "source", "actor", "reason", "event_id", "payment_id", "state", "outcome", "error_class", "duration_ms", "detail")


async def record(
    conn: psycopg.AsyncConnection[Any], service_id: str, kind: str, *, source: str | None = None, actor: str | None = None,
    reason: str | None = None, event_id: str | None = None, payment_id: str | None = None, state: str | None = None,
    outcome: str | None = None, error_class: str | None = None, duration_ms: float | None = None, detail: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    await conn.execute(RECORD, {
        "service_id": service_id, "kind": kind, "source": source, "actor": actor, "reason": reason, "event_id": event_id,
        "payment_id": payment_id, "state": state, "outcome": outcome, "error_class": error_class, "duration_ms": duration_ms,
        "detail": Jsonb(detail or {}),
    })  # fmt: skip


async def list_history(conn: psycopg.AsyncConnection[Any], service_id: str, *, limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
    """Newest first."""
    cur = await conn.execute(LIST, {"service_id": service_id, "limit": limit, "before_id": before_id})
    return [dict(zip(COLUMNS, row, strict=True)) for row in await cur.fetchall()]
