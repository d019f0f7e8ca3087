"""Fetching: one loop per queue that drains it, then sleeps until there is reason to read again; and the
fallback poll that checks every queue in one statement.

A fetch loop drains its queue until a read comes back short, then marks itself as waiting (producers notify
only while a mark exists), checks once more, and sleeps until the first of: a notification, the fallback
poll, the moment a delayed or retried message becomes visible, a re-check of producers that raced with the
mark, or the stop signal. See docs/wakeups.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import _sql
from ._app import QueueConfig
from ._completer import Completer
from ._config import WorkerConfig
from ._db import DB_ERRORS, Database, Row
from ._events import WakeupSource, WorkerObserver
from ._leases import Lease, LeaseKeeper
from ._listener import Listener
from ._slots import Slots

TIMER_MARGIN = 0.002
RECHECK_FIRST = 0.005
EMPTY_DRAIN_BACKOFF_MAX = 1.0

StartJob = Callable[[Lease, Row], None]


@dataclass(frozen=True)
class SleepPlan:
    work_due: bool
    next_visible_in: float | None
    in_flight: list[str]


@dataclass(frozen=True)
class PendingRead:
    """A read on its way: what it asked for, the acknowledgements it carries, and its statement."""

    qty: int
    acks: list[Lease]
    unmark: bool
    sent_at: float  # monotonic: leases count from here
    statement: asyncio.Task[list[Row]]


@dataclass
class QueueFetcher:
    """The fetch state of one queue; the loop itself is :meth:`Fetchers.run_queue`."""

    config: QueueConfig
    batch_size: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    wake_sources: set[WakeupSource] = field(default_factory=set)
    marked_pid: int | None = None  # listener pid our waiting mark names, None when not marked
    mark_verified: bool = False  # a check after marking found no racing producer left to wait for
    db_failures: int = 0
    local_due: float | None = None  # monotonic time a retry this worker scheduled becomes visible
    empty_drains: int = 0  # drains in a row that found work due but read nothing (row locked, or taken)
    held_seen: tuple[int, int] | None = None  # (msg_id, times) of another worker's lease we planned on
    batch_failure: BaseException | None = None  # an error while starting a batch in a callback (a bug of ours)
    read: bytes = field(init=False)
    read_unmark: bytes = field(init=False)

    def __post_init__(self) -> None:
        # Built once: the same text on every call lets psycopg prepare the statements.
        self.read = _sql.compiled(_sql.read(self.config.name, unmark=False))
        self.read_unmark = _sql.compiled(_sql.read(self.config.name, unmark=True))

    @property
    def name(self) -> str:
        return self.config.name

    def wake_up(self, source: WakeupSource) -> None:
        self.wake_sources.add(source)
        self.wake.set()

    def retry_scheduled(self, delay: float) -> None:
        due = time.monotonic() + delay
        if self.local_due is None or due < self.local_due:
            self.local_due = due
            self.wake.set()  # the loop may be asleep with a later timer: re-plan, no query needed


class Fetchers:
    def __init__(
        self,
        config: WorkerConfig,
        queues: dict[str, QueueFetcher],
        db: Database,
        slots: Slots,
        leases: LeaseKeeper,
        completer: Completer,
        observers: WorkerObserver,
        stop: asyncio.Event,
        start_job: StartJob,
    ) -> None:
        self.config = config
        self.queues = queues
        self._db = db
        self._slots = slots
        self._leases = leases
        self._completer = completer
        self._observers = observers
        self._stop = stop
        self._start_job = start_job
        self.listener: Listener | None = None
        self.poll_now = asyncio.Event()
        self.unstarted: list[Lease] = []  # read while stopping: handed back without running

    # -- the fetch loop -------------------------------------------------------------------------------------

    async def run_queue(self, q: QueueFetcher, stop_when_idle: bool) -> None:
        source: WakeupSource | None = WakeupSource.STARTUP
        must_drain = True
        recheck: list[str] | None = None
        recheck_delay = RECHECK_FIRST
        # The start-up drain below covers every wakeup that came before it (the first LISTEN connection's
        # catch-up included), so those would only cost a second read, mark and check.
        if not self._stop.is_set():
            q.wake.clear()
            q.wake_sources.clear()
        while not self._stop.is_set():
            if must_drain:
                await self._drain_after(q, source, stop_when_idle)
                source = None
                if self._stop.is_set():
                    return
            plan = await self._plan_sleep(q, recheck)
            if plan is None:  # database error, already logged; try again after the backoff
                must_drain, recheck = True, None
                continue
            if plan.work_due:
                must_drain = True
                continue
            if stop_when_idle and not plan.in_flight:
                return
            if plan.in_flight:
                if recheck is None:
                    recheck_delay = RECHECK_FIRST
                recheck = plan.in_flight
            else:
                recheck, recheck_delay = None, RECHECK_FIRST
            source = await self._wait(q, plan, recheck_delay if recheck else None)
            if source is None:
                return
            if source is WakeupSource.RECHECK:
                recheck_delay = min(recheck_delay * 2, self.config.missed_wakeup_bound)
                must_drain = False  # the re-check itself tells whether work is due (and counts if it is)
            else:
                recheck, recheck_delay = None, RECHECK_FIRST
                must_drain = True

    async def _drain_after(self, q: QueueFetcher, source: WakeupSource | None, stop_when_idle: bool) -> None:
        if source is not None:
            self._observers.wakeup(q.name, source)  # counted once, by what really woke the loop
        read_any = await self._drain(q)
        if self._stop.is_set():
            return
        if stop_when_idle:
            await self._slots.wait_all_free()
        if not read_any:
            await self._back_off_empty(q)

    async def _back_off_empty(self, q: QueueFetcher) -> None:
        """Work was due but the drain read nothing: a visible message is row-locked by another transaction,
        or another worker was faster. Back off instead of spinning on the check."""
        q.empty_drains += 1
        if q.empty_drains <= 1:
            return
        delay = min(EMPTY_DRAIN_BACKOFF_MAX, 0.01 * 2.0 ** (q.empty_drains - 2)) * (0.5 + random.random() / 2)
        await self._sleep_unless_stopped(delay)

    async def _drain(self, q: QueueFetcher) -> bool:
        """Read and start jobs until a read comes back short (or the worker stops); whether it read any.

        While slots are free, the next read goes out as soon as a full one comes back, before that one's jobs
        are started: the server reads batch N+1 (and deletes what finished before) while batch N runs. Read
        and run one after the other, the worker and the server each waited half the time for the other."""
        read_any = False
        pending: PendingRead | None = None
        while True:
            self._observers.loop_tick()
            self._db.health.last_tick = time.monotonic()
            if pending is None:
                if self._stop.is_set():
                    return read_any
                want = await self._slots.take(q.batch_size)
                if want == 0:
                    return read_any
                pending = self._send_read(q, want)
            read, pending = pending, None
            try:
                rows, acked = await self._receive(q, read)
            except DB_ERRORS as exc:
                self._raise_batch_failure(q)
                self._slots.give(read.qty)
                q.db_failures += 1
                delay = self._db.backoff(q.db_failures)
                self._db.failed("read", exc, queue=q.name, retry_in=round(delay, 3))
                q.marked_pid, q.mark_verified = None, False
                await self._sleep_unless_stopped(delay)
                continue
            self._raise_batch_failure(q)
            q.db_failures = 0
            self._slots.give(read.qty - len(rows))
            if rows:
                read_any = True
                q.empty_drains = 0
            full = len(rows) == read.qty
            if full and not self._stop.is_set():
                more = self._slots.take_nowait(q.batch_size)
                if more:
                    pending = self._send_read(q, more)
            if pending is None:
                self._start_batch(q, read, rows, acked)
            else:
                # The next read's task writes its statement at its first step, queued just now: the batch
                # (its confirmations, leases and job tasks: 0.2 ms for 50) starts right after that, not before.
                asyncio.get_running_loop().call_soon(self._start_batch_soon, q, read, rows, acked)
            if not full:
                return read_any

    def _start_batch_soon(self, q: QueueFetcher, read: PendingRead, rows: list[Row], acked: set[int]) -> None:
        """:meth:`_start_batch` as a callback. An error in it is a bug of ours: kept for the fetch loop to raise
        (see :meth:`_raise_batch_failure`), so that the worker stops as if the batch had started inline,
        instead of going on with the slots of the rows it never started."""
        try:
            self._start_batch(q, read, rows, acked)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the fetch loop
            q.batch_failure = exc

    @staticmethod
    def _raise_batch_failure(q: QueueFetcher) -> None:
        if q.batch_failure is not None:
            failure, q.batch_failure = q.batch_failure, None
            raise failure

    def _start_batch(self, q: QueueFetcher, read: PendingRead, rows: list[Row], acked: set[int]) -> None:
        """Confirm the acknowledgements a read carried, then start the jobs it leased (or keep them to hand
        back, when the worker is stopping)."""
        if read.acks:
            self._completer.confirmed(read.acks, acked)
        for row in rows:
            lease = self._leases.hold(q.config, row[0], row[1], read.sent_at)
            if self._stop.is_set():
                self.unstarted.append(lease)
                self._slots.give(1)
            else:
                self._start_job(lease, row)

    def _send_read(self, q: QueueFetcher, qty: int) -> PendingRead:
        """Send a read of up to ``qty`` messages that carries the queue's pending acknowledgements along."""
        acks = self._completer.take_piggyback(q.name)
        unmark = q.marked_pid is not None
        params = {
            "queue": q.name,
            "vt": q.config.visibility_timeout,
            "qty": qty,
            "worker": self.config.worker_id,
            "ids": _sql.int_array(lease.msg_id for lease in acks),
            "cts": _sql.int_array(lease.read_ct for lease in acks),
        }
        self._completer.acks[q.name].reading = True
        sent_at = time.monotonic()
        return PendingRead(qty, acks, unmark, sent_at, self._db.start(q.read_unmark if unmark else q.read, params))

    async def _receive(self, q: QueueFetcher, read: PendingRead) -> tuple[list[Row], set[int]]:
        """The messages leased by a read, and the ids of its acknowledgements that matched (to be confirmed)."""
        try:
            result = await self._db.result(read.statement)
        except BaseException:
            self._completer.give_back(q.name, read.acks)  # not acknowledged after all: retried with the next round
            raise
        finally:
            self._completer.acks[q.name].reading = False
        if read.unmark:
            q.marked_pid, q.mark_verified = None, False
        rows = [row for row in result if row[1] is not None]
        return rows, ({row[0] for row in result if row[1] is None} if read.acks else set())

    # -- going to sleep -------------------------------------------------------------------------------------

    async def _plan_sleep(self, q: QueueFetcher, recheck: list[str] | None) -> SleepPlan | None:
        listener = self.listener
        q.local_due = None  # the check below sees every retry committed so far
        try:
            if listener is not None and listener.connected and listener.pid is not None and q.marked_pid != listener.pid:
                await self._db.execute(_sql.MARK_WAITING, {"queue": q.name, "worker": self.config.worker_id, "pid": listener.pid})
                q.marked_pid, q.mark_verified, recheck = listener.pid, False, None
            if recheck:
                rows = await self._db.fetchall(_sql.per_queue(_sql.recheck, q.name), {"xids": recheck})
            else:
                rows = await self._db.fetchall(_sql.per_queue(_sql.sleep_check, q.name))
        except DB_ERRORS as exc:
            q.db_failures += 1
            delay = self._db.backoff(q.db_failures)
            self._db.failed("check", exc, queue=q.name, retry_in=round(delay, 3))
            q.marked_pid, q.mark_verified = None, False
            await self._sleep_unless_stopped(delay)
            return None
        q.db_failures = 0
        in_flight, next_vt, now, next_held = rows[0]
        # Racing producers matter only while a fresh mark is unverified; in poll-only mode nobody marks.
        racing = list(in_flight or []) if (q.marked_pid is not None and not q.mark_verified) else []
        if q.marked_pid is not None and not racing:
            q.mark_verified = True
        until = None if next_vt is None else (next_vt - now).total_seconds()
        held_until = self._held_timer(q, next_held)
        if held_until is not None and (until is None or held_until < until):
            until = held_until
        if until is None:
            return SleepPlan(work_due=False, next_visible_in=None, in_flight=racing)
        return SleepPlan(work_due=until <= 0, next_visible_in=max(until, 0.0), in_flight=racing)

    def _held_timer(self, q: QueueFetcher, next_held: list[float] | None) -> float | None:
        """When to look again at the earliest lease another worker holds: at its end the first time (its
        holder may have died), then, while the same message keeps being renewed, at growing intervals."""
        if not next_held:
            q.held_seen = None
            return None
        msg_id, until = int(next_held[0]), float(next_held[1])
        if self._leases.holds(q.name, msg_id):
            return None  # our own job: it wakes nobody when it ends
        seen = q.held_seen[1] if q.held_seen is not None and q.held_seen[0] == msg_id else 0
        q.held_seen = (msg_id, seen + 1)
        if seen == 0:
            return until
        return max(until, min(q.config.visibility_timeout * 2.0**seen, 3600.0))

    async def _wait(self, q: QueueFetcher, plan: SleepPlan, recheck_delay: float | None) -> WakeupSource | None:
        """Sleep until the first wakeup; returns its source, or None when stopping."""
        started = time.monotonic()
        deadlines: list[tuple[float, WakeupSource]] = []
        if plan.next_visible_in is not None:
            deadlines.append((started + plan.next_visible_in + TIMER_MARGIN, WakeupSource.TIMER))
        if recheck_delay is not None:
            deadlines.append((started + recheck_delay, WakeupSource.RECHECK))
        while True:
            candidates = list(deadlines)
            if q.local_due is not None:
                candidates.append((q.local_due + TIMER_MARGIN, WakeupSource.TIMER))
            deadline, deadline_source = min(candidates, default=(None, WakeupSource.TIMER), key=lambda d: d[0] if d[0] is not None else float("inf"))
            if not q.wake.is_set():
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(q.wake.wait(), timeout=timeout)
            self._db.health.last_tick = time.monotonic()
            if self._stop.is_set():
                return None
            if not q.wake.is_set():
                return deadline_source
            q.wake.clear()
            sources, q.wake_sources = q.wake_sources, set()
            if not sources:
                continue  # only a new timer (a retry of ours, or one the poll found): sleep again with it
            for preferred in (WakeupSource.NOTIFY, WakeupSource.RECONNECT, WakeupSource.TIMER):
                if preferred in sources:
                    return preferred
            return WakeupSource.POLL

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # -- the fallback poll ----------------------------------------------------------------------------------

    async def run_poll(self) -> None:
        """One statement checks every queue of this worker, whatever their number."""
        failures = 0
        query = _sql.compiled(_sql.poll_check(list(self.queues)))
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.poll_now.wait(), timeout=self._poll_delay())
            self.poll_now.clear()
            try:
                rows = await self._db.fetchall(query)
            except DB_ERRORS as exc:
                failures += 1
                delay = self._db.backoff(failures)
                self._db.failed("poll", exc, retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            failures = 0
            self._db.health.last_tick = now_mono = time.monotonic()
            self._observers.loop_tick()
            for name, next_vt, now in rows:
                self._apply_poll(name, next_vt, now, now_mono)

    def _apply_poll(self, name: str, next_vt: Any, now: Any, now_mono: float) -> None:
        if next_vt is None:
            return
        until = (next_vt - now).total_seconds()
        q = self.queues[name]
        if until <= 0:
            q.wake_up(WakeupSource.POLL)
        elif q.local_due is None or now_mono + until < q.local_due:
            q.local_due = now_mono + until
            q.wake.set()  # a timer this loop did not know of (e.g. another worker's retry)

    def _poll_delay(self) -> float | None:
        listener = self.listener
        if listener is not None and not listener.connected:
            return self.config.degraded_poll_interval
        return self.config.poll.next_delay(datetime.now(UTC), jitter=0.1 * random.random())
