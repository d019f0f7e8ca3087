"""Outcome writes about held messages: batched acknowledgements, retries, dead-letter moves and hand-backs.

Every write is fenced by the delivery (``msg_id`` and ``read_ct``) and reports whether it still matched: a
write that matches nothing means the lease was lost, which is logged, counted, and never taken for success.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb

from . import _sql
from ._app import QueueConfig
from ._db import DB_ERRORS, Database
from ._leases import Lease, LeaseKeeper
from ._names import dlq_name
from .logging_setup import redact_text

logger = logging.getLogger(__name__)

TRACEBACK_LIMIT = 2000
ACK_LINGER = 0.002
# While the queue's read is in flight, its next read (right after, if the drain goes on) takes the pending
# acknowledgements along: the acknowledger waits for it, but never longer than this after the first of them.
ACK_DEFER_MAX = 0.02


def error_info(exc: BaseException, reason: str) -> dict[str, Any]:
    """What the dead-letter queue records about a failure; secrets masked as in the logs."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=6))
    text = text if len(text) <= TRACEBACK_LIMIT else "..." + text[-TRACEBACK_LIMIT:]
    return {
        "reason": reason,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": redact_text(str(exc))[:1000],
        "traceback": redact_text(text),
    }


@dataclass
class QueueAcks:
    """Finished deliveries of one queue waiting to be acknowledged."""

    config: QueueConfig
    pending: list[Lease] = field(default_factory=list)
    statement: bytes = field(init=False)
    reading: bool = False  # the fetch loop's read of this queue is in flight (set by the fetch loop)
    first_pending_at: float | None = None  # monotonic: when the oldest pending acknowledgement was queued

    def __post_init__(self) -> None:
        name = self.config.name
        self.statement = _sql.per_queue(_sql.archive_held if self.config.on_success == "archive" else _sql.delete_held, name)

    @property
    def piggyback(self) -> bool:
        """Acknowledgements by deletion ride along with the next read of the queue."""
        return self.config.on_success == "delete"


def fence_params(leases: list[Lease]) -> dict[str, str]:
    return {"ids": _sql.int_array(lease.msg_id for lease in leases), "cts": _sql.int_array(lease.read_ct for lease in leases)}


class Completer:
    def __init__(self, db: Database, leases: LeaseKeeper, queues: dict[str, QueueConfig]) -> None:
        self._db = db
        self._leases = leases
        self.acks = {name: QueueAcks(config) for name, config in queues.items()}
        self._wake = asyncio.Event()
        self._closing = False

    # -- acknowledgements -----------------------------------------------------------------------------------

    def ack(self, lease: Lease) -> None:
        acks = self.acks[lease.queue.name]
        if not acks.pending:
            acks.first_pending_at = time.monotonic()
        acks.pending.append(lease)
        self._wake.set()

    def take_piggyback(self, queue: str) -> list[Lease]:
        acks = self.acks[queue]
        if not acks.piggyback:
            return []
        taken, acks.pending = acks.pending, []
        return taken

    def give_back(self, queue: str, leases: list[Lease]) -> None:
        """A read that carried these acknowledgements failed: they go out with the next round."""
        if leases:
            acks = self.acks[queue]
            if not acks.pending:
                acks.first_pending_at = time.monotonic()
            acks.pending[:0] = leases
            self._wake.set()

    def confirmed(self, leases: list[Lease], matched: set[int], operation: str = "ack") -> None:
        for lease in leases:
            self._leases.release(lease)
            if lease.msg_id not in matched:
                self._leases.lose(lease, "taken", operation)

    async def run(self) -> None:
        """Acknowledge finished messages in batches: one statement per queue per round."""
        failures = 0
        deferred_until: float | None = None
        while True:
            if deferred_until is None:
                await self._wake.wait()
                # Linger a moment: a fetch loop about to read takes the acknowledgements along in its statement.
                await asyncio.sleep(ACK_LINGER)
            else:
                # Deferred to a read in flight: look again at the bound only, not at every new acknowledgement
                # (during a drain they come every few microseconds).
                await asyncio.sleep(max(0.0, deferred_until - time.monotonic()))
            self._wake.clear()
            ok, deferred_until = await self._round(defer=not self._closing)
            if self._closing:
                return
            if ok:
                failures = 0
            else:
                failures += 1
                await asyncio.sleep(self._db.backoff(failures))
                self._wake.set()

    async def _round(self, defer: bool = False) -> tuple[bool, float | None]:
        """Send what is pending; with ``defer``, leave a queue's acknowledgements to its read in flight (each
        read statement deletes what it carries: a separate DELETE per batch cost a third of the drain's
        statements). Returns whether the database took everything sent, and when to look at deferred ones."""
        ok = True
        deferred_until: float | None = None
        now = time.monotonic()
        for queue, acks in self.acks.items():
            if not acks.pending:
                continue
            if defer and acks.reading and acks.piggyback and acks.first_pending_at is not None and now - acks.first_pending_at < ACK_DEFER_MAX:
                until = acks.first_pending_at + ACK_DEFER_MAX
                deferred_until = until if deferred_until is None else min(deferred_until, until)
                continue
            leases, acks.pending = acks.pending, []
            if self._db.health.acknowledger_stalled_since is None:
                self._db.health.acknowledger_stalled_since = time.monotonic()
            try:
                rows = await self._db.fetchall(acks.statement, fence_params(leases))
            except DB_ERRORS as exc:
                acks.pending[:0] = leases
                self._db.failed("ack", exc, queue=queue, pending=len(acks.pending))
                ok = False
                continue
            except BaseException:
                acks.pending[:0] = leases
                raise
            self.confirmed(leases, {row[0] for row in rows})
        if ok:
            self._db.health.acknowledger_stalled_since = None
        return ok, deferred_until

    def begin_close(self) -> None:
        """Ask the acknowledger to finish the round it is in and stop (the rest goes out with :meth:`flush`)."""
        self._closing = True
        self._wake.set()

    async def flush(self, deadline: float) -> bool:
        """Send every pending acknowledgement now; False if the database did not take them by ``deadline``."""
        failures = 0
        while any(acks.pending for acks in self.acks.values()):
            if (await self._round())[0]:
                return True
            failures += 1
            if time.monotonic() >= deadline:
                lost = sum(len(acks.pending) for acks in self.acks.values())
                logger.error("acks_unsent", extra={"event": "acks_unsent", "messages": lost, "note": "they will run again after their visibility timeout"})
                return False
            await asyncio.sleep(self._db.backoff(failures))
        return True

    # -- single outcome writes --------------------------------------------------------------------------------

    async def _fenced(self, operation: str, lease: Lease, query: bytes, params: dict[str, Any]) -> bool | None:
        """True: written; False: the lease was lost; None: the database failed (the message comes back later)."""
        if not lease.held:
            return False
        try:
            rows = await self._db.fetchall(query, params)
        except DB_ERRORS as exc:
            self._db.failed(operation, exc, queue=lease.queue.name, msg_id=lease.msg_id)
            self._leases.release(lease)
            return None
        self._leases.release(lease)
        if not rows:
            self._leases.lose(lease, "taken", operation)
            return False
        return True

    async def retry(self, lease: Lease, delay: float) -> bool | None:
        return await self._fenced("retry", lease, _sql.per_queue(_sql.retry_later, lease.queue.name), {"msg_id": lease.msg_id, "read_ct": lease.read_ct, "delay": delay})

    async def dead_letter(self, lease: Lease, error: dict[str, Any]) -> bool | None:
        queue = lease.queue.name
        params = {"queue": queue, "dlq": dlq_name(queue), "msg_id": lease.msg_id, "read_ct": lease.read_ct, "error": Jsonb(error)}
        return await self._fenced("dead_letter", lease, _sql.per_queue(_sql.dead_letter, queue), params)

    async def mark_solo(self, lease: Lease) -> bool | None:
        return await self._mark(lease, _sql.per_queue(_sql.mark_solo, lease.queue.name))

    async def _mark(self, lease: Lease, query: bytes) -> bool | None:
        """A fenced write that keeps the lease (it is not an outcome)."""
        try:
            rows = await self._db.fetchall(query, {"msg_id": lease.msg_id, "read_ct": lease.read_ct})
        except DB_ERRORS as exc:
            self._db.failed("mark_solo", exc, queue=lease.queue.name, msg_id=lease.msg_id)
            return None
        if not rows:
            self._leases.lose(lease, "taken", "mark_solo")
            return False
        return True

    async def hand_back(self, leases: list[Lease]) -> None:
        """Make interrupted deliveries visible again at once (at shutdown); they do not count as attempts."""
        by_queue: dict[str, list[Lease]] = {}
        for lease in leases:
            if lease.held:
                by_queue.setdefault(lease.queue.name, []).append(lease)
        for queue, held in by_queue.items():
            try:
                rows = await self._db.fetchall(_sql.per_queue(_sql.hand_back, queue), fence_params(held))
            except DB_ERRORS as exc:
                self._db.failed("hand_back", exc, queue=queue, msg_ids=[lease.msg_id for lease in held])
                continue
            self.confirmed(held, {row[0] for row in rows}, "hand_back")
            logger.info("jobs_handed_back", extra={"event": "jobs_handed_back", "queue": queue, "msg_ids": sorted(row[0] for row in rows)})
