"""Leases: every message this worker holds, from its read until its outcome is written.

The lease keeper renews visibility timeouts at half their length, one fenced statement per queue. Whether a
lease still holds is judged from a clock, not from the keeper's statements: each lease is lost just before the
moment its visibility timeout could have run out (counted from when the last successful read or renewal was
*sent*), and its job stopped, even while a renewal statement hangs. A renewal that matches no row (another
worker holds a newer delivery) loses the lease too.

The clock is one timer for all leases, armed no later than the earliest moment any lease could expire (a
timer per lease cost a handle, a heap push and a cancel for every job). Leases read together expire together,
and later reads expire later, so the timer is rarely moved: when it fires it loses what is due and re-arms at
the next expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _sql
from ._app import QueueConfig
from ._db import DB_ERRORS, Database
from ._events import WorkerObserver

logger = logging.getLogger(__name__)

# A lease counts as lost this long before its visibility timeout could end: time to stop the job first.
EXPIRY_MARGIN_MAX = 1.0


@dataclass(eq=False)
class Lease:
    """One delivery held by this worker: ``(msg_id, read_ct)`` is what every write about it is fenced by."""

    queue: QueueConfig
    msg_id: int
    read_ct: int
    expires_at: float  # monotonic: our conservative view of when the visibility timeout ends
    renew_at: float
    lost: str | None = None  # why the lease is gone ("expired", "taken"), None while held
    closing: bool = False  # its outcome is being written: a renewal that misses it raced with that write
    done: Any = None  # what the executor needs to count the job once its acknowledgement is confirmed
    on_lost: Callable[[Lease], None] | None = None
    lost_at: float = field(default=0.0, repr=False)  # monotonic: when the clock counts it lost (expires_at - margin)
    deadline: float = field(default=float("inf"), repr=False)  # monotonic: when the running job times out
    on_deadline: Callable[[Lease], None] | None = field(default=None, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)  # the job's task, once it has one

    @property
    def held(self) -> bool:
        return self.lost is None

    @property
    def margin(self) -> float:
        return expiry_margin(self.queue.visibility_timeout)

    def alive(self) -> bool:
        """Still ours by the clock, whether or not the lease timer could fire yet (the event loop may be busy,
        or the caller a thread): what a job checks at the moment it starts."""
        return self.lost is None and time.monotonic() < self.lost_at


def expiry_margin(visibility_timeout: float) -> float:
    """How long before its visibility timeout could end a lease counts as lost: time to stop the job."""
    return min(EXPIRY_MARGIN_MAX, visibility_timeout * 0.1)


class LeaseKeeper:
    def __init__(self, db: Database, observers: WorkerObserver) -> None:
        self._db = db
        self._observers = observers
        # Called when a delivery of ours ends with no outcome written: its message becomes visible when the
        # lease runs out, and the fetch loop of its queue should look then, not at the next fallback poll.
        self.on_ended: Callable[[Lease, float], None] | None = None
        self._leases: dict[tuple[str, int], Lease] = {}
        self._wake = asyncio.Event()
        self._next_renewal = float("inf")
        self._clock: asyncio.TimerHandle | None = None
        self._clock_at = float("inf")  # monotonic time the clock fires; never later than any lease's lost_at

    def __len__(self) -> int:
        return len(self._leases)

    def holds(self, queue: str, msg_id: int) -> bool:
        return (queue, msg_id) in self._leases

    def hold(self, queue: QueueConfig, msg_id: int, read_ct: int, sent_at: float) -> Lease:
        """Start holding a delivery read by a statement sent at ``sent_at`` (monotonic)."""
        expires_at = sent_at + queue.visibility_timeout
        lease = Lease(queue, msg_id, read_ct, expires_at, sent_at + queue.visibility_timeout / 2)
        self._leases[(queue.name, msg_id)] = lease
        self._arm(lease)
        if lease.renew_at < self._next_renewal:
            self._wake.set()
        return lease

    def release(self, lease: Lease) -> None:
        """The delivery's outcome is written (or given up): stop renewing it."""
        if self._leases.get((lease.queue.name, lease.msg_id)) is lease:
            del self._leases[(lease.queue.name, lease.msg_id)]

    def abandon(self, lease: Lease) -> None:
        """Stop renewing a delivery whose outcome could not be written: its message comes back at its lease's end."""
        self.release(lease)
        self._ended(lease)

    def _ended(self, lease: Lease) -> None:
        if self.on_ended is not None:
            # Our view of the end is early by up to the read's round trip: look a margin later (a look that
            # comes too early plans on the message's real vt anyway).
            self.on_ended(lease, max(0.0, lease.expires_at + lease.margin - time.monotonic()))

    def lose(self, lease: Lease, why: str, operation: str) -> None:
        """The delivery is not ours any more: stop the job, and never write about it again."""
        if lease.lost is not None:
            return
        lease.lost = why
        self.release(lease)
        if why == "expired":
            self._ended(lease)  # ("taken": another worker holds the message; it is theirs to finish)
        self._observers.lease_lost(lease.queue.name, lease.msg_id, operation)
        logger.warning(
            "lease_lost",
            extra={
                "event": "lease_lost",
                "queue": lease.queue.name,
                "msg_id": lease.msg_id,
                "attempt": lease.read_ct,
                "operation": operation,
                "why": why,
                "note": "the job is stopped and its result not written; the message runs again elsewhere",
            },
        )
        if lease.on_lost is not None:
            lease.on_lost(lease)

    def _arm(self, lease: Lease) -> None:
        lease.lost_at = lease.expires_at - lease.margin
        if lease.lost_at < self._clock_at:
            self._set_clock(lease.lost_at)

    def set_deadline(self, lease: Lease, seconds: float, on_deadline: Callable[[Lease], None]) -> None:
        """Call ``on_deadline`` once, ``seconds`` from now, unless :meth:`clear_deadline` or the lease's end
        comes first. The same clock as the leases: no timer per job (``asyncio.timeout`` cost one each)."""
        lease.deadline = time.monotonic() + seconds
        lease.on_deadline = on_deadline
        if lease.deadline < self._clock_at:
            self._set_clock(lease.deadline)

    @staticmethod
    def clear_deadline(lease: Lease) -> None:
        lease.deadline, lease.on_deadline = float("inf"), None

    def _set_clock(self, at: float) -> None:
        if self._clock is not None:
            self._clock.cancel()
        self._clock_at = at
        loop = asyncio.get_running_loop()
        # loop.time() is monotonic too, but not necessarily time.monotonic(): convert.
        self._clock = loop.call_at(loop.time() + (at - time.monotonic()), self._tick)

    def _tick(self) -> None:
        """The clock: lose every lease whose time is up, then re-arm at the next one."""
        self._clock, self._clock_at = None, float("inf")
        now = time.monotonic() + 0.001  # the loop may run a timer a hair early: never re-arm for a microsecond
        late = [lease for lease in self._leases.values() if lease.deadline <= now]
        for lease in late:
            on_deadline = lease.on_deadline
            self.clear_deadline(lease)
            if on_deadline is not None:
                on_deadline(lease)
        due = [lease for lease in self._leases.values() if lease.lost_at <= now]
        for lease in due:
            self.lose(lease, "expired", "lease_clock")
        if self._leases and self._clock is None:
            self._set_clock(min(min(lease.lost_at, lease.deadline) for lease in self._leases.values()))

    async def run(self) -> None:
        """Renew the leases that are due, one statement per queue."""
        while True:
            if not self._leases:
                self._next_renewal = float("inf")
                self._db.health.lease_keeper_stalled_since = None
                await self._wake.wait()
                self._wake.clear()
                continue
            self._next_renewal = min(lease.renew_at for lease in self._leases.values())
            delay = self._next_renewal - time.monotonic()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                continue
            if self._db.health.lease_keeper_stalled_since is None:
                self._db.health.lease_keeper_stalled_since = time.monotonic()
            await self._renew_due(time.monotonic())

    async def _renew_due(self, now: float) -> None:
        due: dict[str, list[Lease]] = {}
        all_renewed = True
        for lease in self._leases.values():
            if lease.renew_at <= now:
                due.setdefault(lease.queue.name, []).append(lease)
        for queue, leases in due.items():
            config = leases[0].queue
            sent_at = time.monotonic()
            try:
                # Bounded: a renewal that cannot finish within a quarter of the lease is useless anyway, and
                # the keeper must get back to the other queues.
                rows = await self._db.fetchall(
                    _sql.per_queue(_sql.extend_leases, queue),
                    {"ids": _sql.int_array(lease.msg_id for lease in leases), "cts": _sql.int_array(lease.read_ct for lease in leases), "vt": config.visibility_timeout},
                    timeout=max(1.0, config.visibility_timeout / 4),
                )
            except DB_ERRORS as exc:
                self._db.failed("renew_lease", exc, queue=queue, msg_ids=[lease.msg_id for lease in leases])
                retry_at = time.monotonic() + min(1.0, config.visibility_timeout / 4)
                for lease in leases:
                    lease.renew_at = retry_at
                all_renewed = False
                continue
            renewed = {row[0] for row in rows}
            for lease in leases:
                if lease.lost is not None:
                    continue  # lost while the statement ran: its timer already stopped the job
                if self._leases.get((queue, lease.msg_id)) is not lease:
                    continue  # its outcome was written while the statement ran: done, not lost
                if lease.msg_id in renewed:
                    lease.expires_at = sent_at + config.visibility_timeout
                    lease.renew_at = sent_at + config.visibility_timeout / 2
                    self._arm(lease)
                elif lease.closing:
                    continue  # its outcome write (which closes or deletes the delivery) won the race: it reports
                else:
                    self.lose(lease, "taken", "renew_lease")
            logger.debug("leases_renewed", extra={"event": "leases_renewed", "queue": queue, "msg_ids": sorted(renewed)})
        if all_renewed:
            self._db.health.lease_keeper_stalled_since = None
