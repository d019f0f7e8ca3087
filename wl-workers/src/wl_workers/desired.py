"""Recording a customer's desired state: the one function every source goes through (webhook-driven jobs,
payment sync, operator CLI, console, reconcile — all through ``device_actions`` jobs; the worker calls this).

An event older than the newest accepted one for the service is refused (``accepted=False``): a late suspension
never undoes a newer payment, in whatever order messages arrive or are retried. An accepted event that changes
the desired state bumps ``desired_generation``; the worker later records ``applied_generation`` only once it has
verified that generation on the router (see actions.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from . import _sql, history
from ._store import NotFound, State


@dataclass(frozen=True)
class RecordResult:
    accepted: bool  # False: older than the newest accepted event (stale)
    generation: int  # the desired generation after this call
    changed: bool = False  # the desired state changed (and the generation moved)


async def record_desired(
    conn: psycopg.AsyncConnection[Any],
    service_id: str,
    state: State,
    *,
    event_at: datetime,
    source: str,
    actor: str | None,
    reason: str | None,
    event_id: str | None = None,
    payment_id: str | None = None,
) -> RecordResult:
    """Accept or refuse one event, with its history rows, in one short transaction of its own (committed before
    the caller talks to any device). Raises :class:`NotFound` for an unknown service."""
    params = {"service_id": service_id, "state": state, "event_at": event_at, "reason": reason, "source": source, "actor": actor}
    common: dict[str, Any] = {"source": source, "actor": actor, "reason": reason, "event_id": event_id, "payment_id": payment_id, "state": state}
    async with conn.transaction():
        cur = await conn.execute(_sql.RECORD_DESIRED, params)
        row = await cur.fetchone()
        if row is None:
            cur = await conn.execute(_sql.DESIRED_OF, (service_id,))
            current = await cur.fetchone()
            if current is None:
                raise NotFound(f"no customer service {service_id!r}")
            detail = {"event_at": event_at.isoformat(), "newest_event_at": current[2].isoformat() if current[2] else None}
            await history.record(conn, service_id, "event_stale", outcome="stale", detail=detail, **common)
            return RecordResult(accepted=False, generation=int(current[1]))
        generation, old_state = int(row[0]), row[1]
        changed = old_state != state
        await history.record(conn, service_id, "event_accepted", outcome="accepted", detail={"event_at": event_at.isoformat(), "generation": generation}, **common)
        if changed:
            await history.record(conn, service_id, "desired_changed", detail={"from": old_state, "generation": generation}, **common)
        return RecordResult(accepted=True, generation=generation, changed=changed)


__all__ = ["RecordResult", "record_desired"]
