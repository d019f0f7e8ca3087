"""Outcome writes about held messages: batched acknowledgements, retries, dead-letter moves and hand-backs.

Every write is fenced by the delivery (``msg_id`` and ``read_ct``) and reports whether it still matched: a
write that matches nothing means the lease was lost, which is logged, counted, and never taken for success.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
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
# A message whose dead-letter queue is gone and cannot be created again waits this long in its own queue (its
# delivery closed, so it is no suspect) instead of cycling through its handler at every lease.
PARK_DELAY = 3600.0
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


@dataclass(eq=False)
class Unwritten:
    """An outcome (retry, dead-letter move) the database did not take. Fenced, so writing it later is safe: if
    the message was read again meanwhile, the write matches nothing."""

    operation: str
    lease: Lease
    query: bytes
    params: dict[str, Any]
    delay: float | None  # a retry's delay: the fetch loop sets its timer once it is written
    failures: int = 1
    at: float = field(default_factory=time.monotonic)  # when the outcome was due

    def current_params(self) -> dict[str, Any]:
        """A retry written late keeps its due time: the delay counts from the failure, not from the write."""
        if self.delay is None:
            return self.params
        return {**self.params, "delay": self.remaining_delay()}

    def remaining_delay(self) -> float:
        return max(0.0, (self.delay or 0.0) - (time.monotonic() - self.at))


class Completer:
    def __init__(
        self, db: Database, leases: LeaseKeeper, queues: dict[str, QueueConfig], on_retry: Callable[[str, float], None] | None = None
    ) -> None:
        self._db = db
        self._leases = leases
        self.acks = {name: QueueAcks(config) for name, config in queues.items()}
        self.unwritten: list[Unwritten] = []
        self._on_retry = on_retry
        # Told whether each acknowledgement matched (True), found the lease lost (False) or could not be sent
        # at all before shutdown (None): a job counts as succeeded only once its acknowledgement is on record.
        self.on_acked: Callable[[Lease, bool | None], None] | None = None
        self._wake = asyncio.Event()
        self._closing = False

    # -- acknowledgements -----------------------------------------------------------------------------------

    def ack(self, lease: Lease) -> None:
        lease.closing = True
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
        on_acked = self.on_acked if operation == "ack" else None
        for lease in leases:
            self._leases.release(lease)
            held = lease.msg_id in matched
            if not held:
                self._leases.lose(lease, "taken", operation)
            if on_acked is not None:
                on_acked(lease, held)

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
        ok = await self._write_unwritten()
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
        while self.unwritten or any(acks.pending for acks in self.acks.values()):
            if (await self._round())[0]:
                return True
            failures += 1
            if time.monotonic() >= deadline:
                lost = sum(len(acks.pending) for acks in self.acks.values())
                if lost:
                    logger.error("acks_unsent", extra={"event": "acks_unsent", "messages": lost, "note": "they will run again after their visibility timeout"})
                    if self.on_acked is not None:
                        for acks in self.acks.values():
                            for lease in acks.pending:
                                self.on_acked(lease, None)
                if self.unwritten:
                    logger.error(
                        "outcomes_unwritten",
                        extra={
                            "event": "outcomes_unwritten",
                            "msg_ids": [u.lease.msg_id for u in self.unwritten],
                            "note": "retries and dead-letter moves not recorded: those messages run again after their visibility timeout",
                        },
                    )
                return False
            await asyncio.sleep(self._db.backoff(failures))
        return True

    # -- single outcome writes --------------------------------------------------------------------------------

    async def _fenced(
        self, operation: str, lease: Lease, query: bytes, params: dict[str, Any], *, delay: float | None = None, reraise: tuple[type[BaseException], ...] = ()
    ) -> bool | None:
        """True: written; False: the lease was lost; None: the database failed, and the write is kept and tried
        again as soon as the database answers (see :meth:`_write_unwritten`)."""
        if not lease.held:
            return False
        lease.closing = True
        try:
            rows = await self._db.fetchall(query, params)
        except reraise:
            raise
        except DB_ERRORS as exc:
            self._db.failed(operation, exc, queue=lease.queue.name, msg_id=lease.msg_id, note="kept: written once the database answers")
            # No more renewals: the lease ends on its own; the keeper wakes the fetch loop then, in case this
            # write never makes it.
            self._leases.abandon(lease)
            self.unwritten.append(Unwritten(operation, lease, query, params, delay))
            self._wake.set()
            return None
        self._leases.release(lease)
        if not rows:
            self._leases.lose(lease, "taken", operation)
            return False
        return True

    async def _write_unwritten(self) -> bool:
        """Outcomes the database did not take, tried again in order; False if it still fails."""
        while self.unwritten:
            item = self.unwritten[0]
            try:
                rows = await self._db.fetchall(item.query, item.current_params())
            except psycopg.errors.UndefinedTable as exc:
                # Its dead-letter queue is gone: give this write up; the message comes back after its lease
                # and its next dead-letter move creates the queue again.
                self.unwritten.pop(0)
                self._db.failed(item.operation, exc, queue=item.lease.queue.name, msg_id=item.lease.msg_id, note="given up")
                continue
            except DB_ERRORS as exc:
                item.failures += 1
                self._db.failed(item.operation, exc, queue=item.lease.queue.name, msg_id=item.lease.msg_id, failures=item.failures)
                return False
            self.unwritten.pop(0)
            lease = item.lease
            if not rows:
                # Read again since (by us or another worker): that delivery goes its own way.
                logger.warning(
                    "outcome_superseded",
                    extra={"event": "outcome_superseded", "operation": item.operation, "queue": lease.queue.name, "msg_id": lease.msg_id, "attempt": lease.read_ct},
                )
                continue
            logger.info(
                "outcome_written_late",
                extra={"event": "outcome_written_late", "operation": item.operation, "queue": lease.queue.name, "msg_id": lease.msg_id, "attempt": lease.read_ct, "failures": item.failures},
            )
            if item.delay is not None and self._on_retry is not None:
                self._on_retry(lease.queue.name, item.remaining_delay())
        return True

    async def retry(self, lease: Lease, delay: float, *, count_attempt: bool = True) -> bool | None:
        query = _sql.per_queue(_sql.retry_later, lease.queue.name, count_attempt=count_attempt)
        params = {"msg_id": lease.msg_id, "read_ct": lease.read_ct, "delay": delay}
        written = await self._fenced("retry", lease, query, params, delay=delay)
        if written and self._on_retry is not None:
            self._on_retry(lease.queue.name, delay)  # the fetch loop looks again when the retry is due
        return written

    async def dead_letter(self, lease: Lease, error: dict[str, Any]) -> bool | None:
        queue = lease.queue.name
        params = {"queue": queue, "dlq": dlq_name(queue), "msg_id": lease.msg_id, "read_ct": lease.read_ct, "error": Jsonb(error)}
        query = _sql.per_queue(_sql.dead_letter, queue)
        try:
            return await self._fenced("dead_letter", lease, query, params, reraise=(psycopg.errors.UndefinedTable,))
        except psycopg.errors.UndefinedTable as exc:
            return await self._dlq_missing(lease, query, params, exc)

    async def _dlq_missing(self, lease: Lease, query: bytes, params: dict[str, Any], exc: BaseException) -> bool | None:
        """The dead-letter queue was dropped under a running worker: create it again and move the message; if
        that is not allowed, park the message in its queue (closed, invisible for ``PARK_DELAY``)."""
        queue, dlq = lease.queue.name, params["dlq"]
        self._db.failed("dead_letter", exc, queue=queue, msg_id=lease.msg_id, dlq=dlq)
        try:
            await self._db.execute(_sql.CREATE_QUEUE, (dlq,))
        except DB_ERRORS as create_exc:
            logger.error(
                "dead_letter_parked",
                extra={
                    "event": "dead_letter_parked",
                    "queue": queue,
                    "msg_id": lease.msg_id,
                    "dlq": dlq,
                    "error": f"{type(create_exc).__name__}: {create_exc}".strip()[:500],
                    "retry_in_s": PARK_DELAY,
                    "note": "the dead-letter queue is missing and could not be created: run `pg-worker install`",
                },
            )
            self._db.failed("dead_letter", create_exc, queue=queue, msg_id=lease.msg_id, dlq=dlq)
            parked = await self._fenced("dead_letter", lease, _sql.per_queue(_sql.retry_later, queue), {"msg_id": lease.msg_id, "read_ct": lease.read_ct, "delay": PARK_DELAY})
            return None if parked else parked
        logger.error("dlq_recreated", extra={"event": "dlq_recreated", "queue": queue, "dlq": dlq, "note": "it had been dropped while the worker ran"})
        return await self._fenced("dead_letter", lease, query, params)

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

    async def hand_back(self, leases: list[Lease], *, abandoned: bool = False) -> None:
        """Make interrupted deliveries visible again at once (at shutdown); they do not count as attempts.

        ``abandoned``: deliveries whose sync thread is still running; they stay leased (see ``_sql.hand_back``).
        """
        by_queue: dict[str, list[Lease]] = {}
        for lease in leases:
            if lease.held:
                by_queue.setdefault(lease.queue.name, []).append(lease)
        for queue, held in by_queue.items():
            try:
                rows = await self._db.fetchall(_sql.per_queue(_sql.hand_back, queue, keep_vt=abandoned), fence_params(held))
            except DB_ERRORS as exc:
                self._db.failed("hand_back", exc, queue=queue, msg_ids=[lease.msg_id for lease in held])
                continue
            self.confirmed(held, {row[0] for row in rows}, "hand_back")
            event = "jobs_abandoned" if abandoned else "jobs_handed_back"
            logger.info(event, extra={"event": event, "queue": queue, "msg_ids": sorted(row[0] for row in rows)})
