"""The worker: fetch loops per queue, job execution, acknowledgements, lease renewal and shutdown.

Wakeups (see docs/wakeups.md): a fetch loop drains its queue until a read comes back short, then marks
itself as waiting (producers notify only while a mark exists), checks once more, and sleeps until the first
of: a notification, the fallback poll, the moment a delayed or retried message becomes visible, a re-check
of producers that raced with the mark, or the stop signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import threading
import time
import traceback
from collections.abc import Awaitable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import psycopg_pool
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb, set_json_loads

from . import _sql
from ._app import App, BadMessage, Handler, Job, QueueConfig
from ._config import WorkerConfig
from ._events import ObserverGroup, Outcome, WakeupSource, WorkerObserver
from ._install import SetupError, check_setup, install
from ._listener import Listener
from ._names import dlq_name
from ._retry import PermanentFailure
from ._slots import Slots

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]

DB_ERRORS = (psycopg.Error, psycopg_pool.PoolTimeout, OSError)
TRACEBACK_LIMIT = 2000
TIMER_MARGIN = 0.002
RECHECK_FIRST = 0.005
ACK_LINGER = 0.002


class JobTimeout(Exception):
    """The job ran past its queue's ``job_timeout`` and was cancelled."""


class WorkerCrashed(RuntimeError):
    """A background task of the worker died; the worker stopped instead of limping on."""


@dataclass
class _Lease:
    """A running job: when its visibility timeout needs renewing, and when its job_timeout cancels it."""

    queue: QueueConfig
    msg_id: int
    renew_at: float
    deadline: float
    task: asyncio.Task[Any] | None
    timed_out: bool = False

    @property
    def wake_at(self) -> float:
        if self.timed_out:
            return float("inf")  # cancelled already; its task removes it in a moment
        return min(self.deadline, self.renew_at)


@dataclass
class _QueueState:
    config: QueueConfig
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    wake_sources: set[WakeupSource] = field(default_factory=set)
    marked_pid: int | None = None  # listener pid our waiting mark names, None when not marked
    mark_verified: bool = False  # a check after marking found no racing producer left to wait for
    pending_acks: list[int] = field(default_factory=list)
    db_failures: int = 0
    local_due: float | None = None  # monotonic time a retry this worker scheduled becomes visible

    batch_size: int = 1

    def __post_init__(self) -> None:
        # Built once: the same text on every call lets psycopg prepare the statements.
        self.read = _sql.read(self.config.name, unmark=False)
        self.read_unmark = _sql.read(self.config.name, unmark=True)
        self.ack = _sql.archive_many(self.config.name) if self.config.on_success == "archive" else _sql.delete_many(self.config.name)

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class _SleepPlan:
    work_due: bool
    next_visible_in: float | None
    in_flight: list[str]


@dataclass
class WorkerHealth:
    """What health endpoints report; updated by the worker as it runs."""

    started: bool = False
    stopping: bool = False
    listening: bool | None = None  # None in poll-only mode
    last_tick: float = field(default_factory=time.monotonic)
    last_notification: float | None = None
    last_db_ok: float | None = None
    last_db_error: str | None = None
    last_db_error_at: float | None = None
    listen_down_since: float | None = field(default_factory=time.monotonic)
    crashed: str | None = None


# Successes are counted in metrics; logging each one at INFO would cost more than a no-op job itself.
_OUTCOME_LEVELS = {
    Outcome.SUCCEEDED: logging.DEBUG,
    Outcome.INTERRUPTED: logging.INFO,
    Outcome.RETRIED: logging.WARNING,
    Outcome.DEAD_LETTERED: logging.ERROR,
}


def _short_traceback(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=6))
    return text if len(text) <= TRACEBACK_LIMIT else "..." + text[-TRACEBACK_LIMIT:]


def _error_info(exc: BaseException, reason: str) -> dict[str, Any]:
    return {
        "reason": reason,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc)[:1000],
        "traceback": _short_traceback(exc),
    }


class Worker:
    """Runs the handlers of an :class:`App` against pgmq.

    ``await worker.run()`` works until :meth:`request_stop` (e.g. on SIGTERM), then shuts down gracefully.
    ``await worker.run(stop_when_idle=True)`` processes what is due and returns (tests, one-off drains).
    """

    def __init__(
        self,
        app: App,
        conninfo: str,
        config: WorkerConfig | None = None,
        *,
        observers: Iterable[WorkerObserver] = (),
        listen_conninfo: str | None = None,
    ) -> None:
        """``listen_conninfo``: where the LISTEN connection goes, if not to ``conninfo``. Behind PgBouncer in
        transaction mode (which cannot LISTEN), point it at PostgreSQL itself."""
        app.validate()
        self.app = app
        self.conninfo = conninfo
        self.listen_conninfo = listen_conninfo or conninfo
        self.config = config or WorkerConfig()
        self.observers = ObserverGroup(list(observers))
        self.health = WorkerHealth(listening=None if not self.config.listen else False)
        # Reads default to half the concurrency, so one batch runs while the next is being read.
        default_batch = max(1, min(100, self.config.concurrency // 2))
        self._queues = {name: _QueueState(cfg, batch_size=cfg.batch_size or default_batch) for name, cfg in app.queues.items()}
        self._leases: dict[tuple[str, int], _Lease] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._interrupted: dict[str, list[int]] = {}
        self._listener: Listener | None = None
        self._pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stop: asyncio.Event | None = None
        self._slots: Slots | None = None
        self._ack_wake: asyncio.Event | None = None
        self._lease_wake: asyncio.Event | None = None
        self._poll_now: asyncio.Event | None = None
        self._lease_wake_at = float("inf")
        self._shutting_down = False
        self._sync_lock = threading.Lock()
        self._ack_task: asyncio.Task[None] | None = None
        self._ack_closing = False
        self._sync_running = 0

    # -- public ---------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin a graceful shutdown: stop reading, let jobs finish within the grace period, hand back the rest."""
        self.health.stopping = True
        if self._stop is not None:
            self._stop.set()
            for q in self._queues.values():
                q.wake.set()

    @property
    def in_flight(self) -> int:
        return 0 if self._slots is None else self._slots.busy

    async def run(self, *, stop_when_idle: bool = False) -> None:
        self._stop = asyncio.Event()
        if self.health.stopping:
            self._stop.set()
        self._slots = Slots(self.config.concurrency)
        self._ack_wake = asyncio.Event()
        self._lease_wake = asyncio.Event()
        self._poll_now = asyncio.Event()
        self._pool = psycopg_pool.AsyncConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=len(self._queues) + 3,
            kwargs={"autocommit": True},
            open=False,
            name="pg-worker",
            timeout=10.0,
            configure=self._configure_connection,
        )
        await self._pool.open(wait=False)
        self._executor = ThreadPoolExecutor(self.config.thread_pool_size, thread_name_prefix="pg-worker-job")
        try:
            if not await self._start_up():
                return
            await self._supervise(stop_when_idle)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
            await self._pool.close()

    async def _configure_connection(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # Leases, acknowledgements, retries and dead-letter moves may all be lost in a database crash without
        # losing a job: the message just comes back (at-least-once). So the worker's own commits need not
        # wait for the WAL flush, which takes that wait off every batch and off the notify-to-handler path.
        # Producers keep their own (normally synchronous) commits: an enqueue is never at risk.
        if not self.config.synchronous_commit:
            await conn.execute("SET synchronous_commit = off")
        set_json_loads(orjson.loads, conn)

    # -- start-up -------------------------------------------------------------------------------------------

    async def _start_up(self) -> bool:
        """Check (or create) queues and wakeup triggers; wait for the database if it is not up yet."""
        assert self._stop is not None
        failures = 0
        while not self._stop.is_set():
            try:
                async with self._connection() as conn, conn.transaction():
                    problems = await check_setup(conn, self._queues)
                    if self.config.listen:
                        await conn.execute(_sql.DELETE_STALE_MARKS)
                if problems:
                    if not self.config.auto_install:
                        raise SetupError("database not ready: " + "; ".join(problems) + " (run `pg-worker install`)")
                    logger.info("auto_install", extra={"event": "auto_install", "problems": problems})
                    await install(self.conninfo, self._queues)
                self.health.started = True
                logger.info(
                    "worker_started",
                    extra={
                        "event": "worker_started",
                        "worker_id": self.config.worker_id,
                        "queues": list(self._queues),
                        "concurrency": self.config.concurrency,
                        "listen": self.config.listen,
                    },
                )
                return True
            except DB_ERRORS as exc:
                failures += 1
                delay = self._db_backoff(failures)
                self._db_failed("startup", exc, retry_in=delay)
                await self._sleep_unless_stopped(delay)
        return False

    # -- supervision ----------------------------------------------------------------------------------------

    async def _supervise(self, stop_when_idle: bool) -> None:
        assert self._stop is not None
        side: dict[asyncio.Task[Any], str] = {}
        if self.config.listen:
            self._listener = Listener(
                self.listen_conninfo,
                self._queues,
                on_notify=self._on_notify,
                on_connected=self._on_listen_connected,
                observer=_ListenWatcher(self),
                reconnect_max=self.config.listen_reconnect_max,
                degraded_poll_interval=self.config.degraded_poll_interval,
            )
            side[asyncio.create_task(self._listener.run(), name="pg-worker-listen")] = "listener"
            # LISTEN before the first drain, so nothing sent in between goes unnoticed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._listener.first_attempt_done.wait(), timeout=10.0)
        self._ack_task = asyncio.create_task(self._ack_loop(), name="pg-worker-ack")
        side[self._ack_task] = "acknowledger"
        side[asyncio.create_task(self._poll_loop(), name="pg-worker-poll")] = "poller"
        side[asyncio.create_task(self._heartbeat(), name="pg-worker-heartbeat")] = "heartbeat"
        side[asyncio.create_task(self._lease_loop(), name="pg-worker-lease")] = "lease keeper"
        fetchers = {
            asyncio.create_task(self._fetch_loop(q, stop_when_idle), name=f"pg-worker-fetch-{q.name}"): q.name
            for q in self._queues.values()
        }
        crashed: BaseException | None = None
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            watched: set[asyncio.Task[Any]] = {*side, *fetchers, stop_wait}
            while True:
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if stop_wait in done:
                    break
                for task in done:
                    watched.discard(task)
                    error = None if task.cancelled() else task.exception()
                    if task in fetchers and error is None:
                        continue  # stop_when_idle: this queue is done
                    what = side.get(task) or f"fetch loop of {fetchers.get(task)}"
                    crashed = error or RuntimeError(f"{what} ended unexpectedly")
                    self.health.crashed = f"{what}: {crashed!r}"
                    logger.critical(
                        "worker_task_died",
                        extra={"event": "worker_task_died", "task": what, "error": repr(crashed)},
                        exc_info=crashed,
                    )
                    self.request_stop()
                if stop_when_idle and not (watched & set(fetchers)):
                    self.request_stop()
        finally:
            await self._shut_down(fetchers, side, stop_wait)
        if crashed is not None:
            raise WorkerCrashed(str(crashed)) from crashed

    async def _shut_down(self, fetchers: dict[asyncio.Task[None], str], side: dict[asyncio.Task[Any], str], stop_wait: asyncio.Task[Any]) -> None:
        assert self._slots is not None and self._stop is not None
        self._shutting_down = True
        self._stop.set()
        self._slots.close()
        for q in self._queues.values():
            q.wake.set()
        await asyncio.wait(list(fetchers), timeout=5.0)
        for task in fetchers:
            task.cancel()
        jobs = list(self._jobs)
        if jobs:
            logger.info("shutdown_waiting_for_jobs", extra={"event": "shutdown_waiting_for_jobs", "jobs": len(jobs), "grace_s": self.config.shutdown_grace})
            _, still_running = await asyncio.wait(jobs, timeout=self.config.shutdown_grace)
            for task in still_running:
                task.cancel()
            if still_running:
                await asyncio.wait(still_running, timeout=5.0)
        # Let the acknowledger finish the round it is in (cancelling it mid-statement could lose a batch of
        # acknowledgements), then send what is left from here.
        self._ack_closing = True
        if self._ack_wake is not None and self._ack_task is not None:
            self._ack_wake.set()
            await asyncio.wait([self._ack_task], timeout=10.0)
        await self._flush_acks(deadline=time.monotonic() + 10.0)
        await self._hand_back_interrupted()
        if self.config.listen:
            await self._best_effort("unmark", self._execute(_sql.UNMARK_WORKER, (self.config.worker_id,)))
        for task in (*side, stop_wait):
            task.cancel()
        await asyncio.gather(*fetchers, *side, stop_wait, return_exceptions=True)
        logger.info("worker_stopped", extra={"event": "worker_stopped", "worker_id": self.config.worker_id})

    # -- database helpers -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self) -> Any:
        assert self._pool is not None
        async with self._pool.connection() as conn:
            yield conn

    async def _fetchall(self, query: Any, params: Any = None) -> list[Row]:
        async with self._connection() as conn:
            cur = await conn.execute(query, params)
            rows: list[Row] = await cur.fetchall()
        self.health.last_db_ok = time.monotonic()
        return rows

    async def _execute(self, query: Any, params: Any = None) -> None:
        async with self._connection() as conn:
            await conn.execute(query, params)
        self.health.last_db_ok = time.monotonic()

    async def _best_effort(self, operation: str, awaitable: Awaitable[Any]) -> None:
        try:
            await awaitable
        except DB_ERRORS as exc:
            self._db_failed(operation, exc)

    def _db_backoff(self, failures: int) -> float:
        ceiling = min(self.config.db_retry_max, 0.05 * 2.0 ** min(failures, 16))
        return float(ceiling * (0.5 + random.random() / 2))

    async def ping_database(self) -> None:
        """One ``SELECT 1`` through the worker's pool (used by readiness when nothing else shows the database)."""
        await self._execute("SELECT 1")

    def _db_failed(self, operation: str, exc: BaseException, **context: Any) -> None:
        self.health.last_db_error = f"{type(exc).__name__}: {exc}".strip()
        self.health.last_db_error_at = time.monotonic()
        self.observers.db_error(operation, exc)
        logger.warning(
            "db_error",
            extra={"event": "db_error", "operation": operation, "error": self.health.last_db_error, **context},
        )

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        assert self._stop is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # -- wakeups --------------------------------------------------------------------------------------------

    def _wake(self, queue: str, source: WakeupSource) -> None:
        state = self._queues.get(queue)
        if state is not None:
            state.wake_sources.add(source)
            state.wake.set()

    def _on_notify(self, queue: str) -> None:
        self.health.last_notification = time.monotonic()
        self._wake(queue, WakeupSource.NOTIFY)

    def _on_listen_connected(self, pid: int) -> None:
        self.health.listening = True
        self.health.listen_down_since = None
        for name in self._queues:
            self._wake(name, WakeupSource.RECONNECT)

    def _on_listen_lost(self) -> None:
        if self.health.listening:
            self.health.listen_down_since = time.monotonic()
        self.health.listening = False
        if self._poll_now is not None:
            self._poll_now.set()  # poll at once, then at the degraded interval until LISTEN is back

    # -- fetching -------------------------------------------------------------------------------------------

    async def _fetch_loop(self, q: _QueueState, stop_when_idle: bool) -> None:
        assert self._stop is not None and self._slots is not None
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
                assert source is not None
                self.observers.wakeup(q.name, source)
                await self._drain(q)
                if self._stop.is_set():
                    return
                if stop_when_idle:
                    await self._slots.wait_all_free()
            plan = await self._plan_sleep(q, recheck)
            if plan is None:  # database error, already logged; try again after the backoff
                must_drain, recheck = True, None
                source = WakeupSource.POLL
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
                must_drain = False  # the re-check itself tells whether work is due
            else:
                recheck, recheck_delay = None, RECHECK_FIRST
                must_drain = True

    async def _drain(self, q: _QueueState) -> None:
        """Read and start jobs until a read comes back short (or the worker stops)."""
        assert self._slots is not None and self._stop is not None
        while not self._stop.is_set():
            self.observers.loop_tick()
            self.health.last_tick = time.monotonic()
            want = await self._slots.take(q.batch_size)
            if want == 0:
                return
            try:
                rows = await self._read(q, want)
            except DB_ERRORS as exc:
                self._slots.give(want)
                q.db_failures += 1
                delay = self._db_backoff(q.db_failures)
                self._db_failed("read", exc, queue=q.name, retry_in=round(delay, 3))
                q.marked_pid, q.mark_verified = None, False
                await self._sleep_unless_stopped(delay)
                continue
            q.db_failures = 0
            self._slots.give(want - len(rows))
            if self._stop.is_set() and rows:
                self._interrupted.setdefault(q.name, []).extend(row[0] for row in rows)
                self._slots.give(len(rows))
                return
            for row in rows:
                task = asyncio.create_task(self._run_job(q, row))
                self._jobs.add(task)
                task.add_done_callback(self._jobs.discard)
            if len(rows) < want:
                return

    async def _read(self, q: _QueueState, qty: int) -> list[Row]:
        acks: list[int] = []
        if q.config.on_success == "delete":
            acks, q.pending_acks = q.pending_acks, []
        unmark = q.marked_pid is not None
        params = {"queue": q.name, "vt": q.config.visibility_timeout, "qty": qty, "worker": self.config.worker_id, "acks": acks}
        try:
            rows = await self._fetchall(q.read_unmark if unmark else q.read, params)
        except BaseException:
            q.pending_acks[:0] = acks  # not acknowledged after all: the acknowledger or the next read retries
            raise
        if unmark:
            q.marked_pid, q.mark_verified = None, False
        return rows

    async def _plan_sleep(self, q: _QueueState, recheck: list[str] | None) -> _SleepPlan | None:
        listener = self._listener
        q.local_due = None  # the check below sees every retry committed so far
        try:
            if listener is not None and listener.connected and listener.pid is not None and q.marked_pid != listener.pid:
                await self._execute(_sql.MARK_WAITING, {"queue": q.name, "worker": self.config.worker_id, "pid": listener.pid})
                q.marked_pid, q.mark_verified, recheck = listener.pid, False, None
            if recheck:
                rows = await self._fetchall(_sql.recheck(q.name), {"xids": recheck})
            else:
                rows = await self._fetchall(_sql.sleep_check(q.name))
        except DB_ERRORS as exc:
            q.db_failures += 1
            delay = self._db_backoff(q.db_failures)
            self._db_failed("check", exc, queue=q.name, retry_in=round(delay, 3))
            q.marked_pid, q.mark_verified = None, False
            await self._sleep_unless_stopped(delay)
            return None
        q.db_failures = 0
        in_flight, next_vt, now = rows[0]
        # Racing producers matter only while a fresh mark is unverified; in poll-only mode nobody marks.
        racing = list(in_flight or []) if (q.marked_pid is not None and not q.mark_verified) else []
        if q.marked_pid is not None and not racing:
            q.mark_verified = True
        if next_vt is None:
            return _SleepPlan(work_due=False, next_visible_in=None, in_flight=racing)
        until = (next_vt - now).total_seconds()
        return _SleepPlan(work_due=until <= 0, next_visible_in=max(until, 0.0), in_flight=racing)

    async def _heartbeat(self) -> None:
        """Proves to the liveness probe (another thread) that this event loop is not blocked. No I/O."""
        while True:
            self.health.last_tick = time.monotonic()
            await asyncio.sleep(1.0)

    async def _poll_loop(self) -> None:
        """The fallback poll: one statement checks every queue of this worker, whatever their number."""
        assert self._poll_now is not None
        failures = 0
        query = _sql.poll_check(list(self._queues))
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poll_now.wait(), timeout=self._poll_delay())
            self._poll_now.clear()
            try:
                rows = await self._fetchall(query)
            except DB_ERRORS as exc:
                failures += 1
                delay = self._db_backoff(failures)
                self._db_failed("poll", exc, retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.health.last_tick = now_mono = time.monotonic()
            self.observers.loop_tick()
            for name, next_vt, now in rows:
                if next_vt is None:
                    continue
                until = (next_vt - now).total_seconds()
                if until <= 0:
                    self._wake(name, WakeupSource.POLL)
                    continue
                q = self._queues[name]
                if q.local_due is None or now_mono + until < q.local_due:
                    q.local_due = now_mono + until
                    q.wake.set()  # a timer this loop did not know of (e.g. another worker's retry)

    def _poll_delay(self) -> float | None:
        listener = self._listener
        if listener is not None and not listener.connected:
            return self.config.degraded_poll_interval
        delay = self.config.poll.next_delay(datetime.now(UTC))
        if delay is None:
            return None
        return delay * (1.0 - 0.1 * random.random())  # jitter only shortens: the interval stays a bound

    async def _wait(self, q: _QueueState, plan: _SleepPlan, recheck_delay: float | None) -> WakeupSource | None:
        """Sleep until the first wakeup; returns its source, or None when stopping."""
        assert self._stop is not None
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
            self.health.last_tick = time.monotonic()
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

    # -- jobs -----------------------------------------------------------------------------------------------

    async def _run_job(self, q: _QueueState, row: Row) -> None:
        assert self._slots is not None
        msg_id, read_ct, enqueued_at, message, headers = row
        try:
            try:
                handler, job_type = self.app.resolve(q.name, message)
                payload = handler.parse(message)
            except BadMessage as exc:
                await self._reject(q, msg_id, read_ct, exc)
                return
            job: Job[Any] = Job(q.name, msg_id, read_ct, enqueued_at, payload, job_type, headers)
            if read_ct > q.config.retry.max_attempts:
                # Only a worker that died mid-job (no retry was recorded) lets read_ct pass max_attempts.
                await self._give_up(q, job, handler, RuntimeError(f"delivered {read_ct} times; the worker died while running it"), "attempts_exhausted", time.perf_counter())
                return
            await self._execute_job(q, job, handler)
        finally:
            self._slots.give(1)

    async def _execute_job(self, q: _QueueState, job: Job[Any], handler: Handler) -> None:
        key = (q.name, job.msg_id)
        task = asyncio.current_task()
        # The lease keeper renews the visibility timeout and enforces job_timeout: one timer for all jobs
        # instead of one per job.
        lease = self._add_lease(key, q.config, task)
        self.observers.job_started(job, max(0.0, time.time() - job.enqueued_at.timestamp()))
        started = time.perf_counter()
        try:
            try:
                if handler.is_async:
                    await handler.func(job)  # type: ignore[misc]
                else:
                    loop = asyncio.get_running_loop()
                    with self._sync_lock:
                        self._sync_running += 1
                    await loop.run_in_executor(self._executor, functools.partial(self._call_sync, handler, job))
            except asyncio.CancelledError:
                if self._shutting_down or not lease.timed_out or task is None:
                    raise
                task.uncancel()
                raise JobTimeout(f"job exceeded job_timeout of {q.config.job_timeout:g}s") from None
        except asyncio.CancelledError:
            if not self._shutting_down:
                raise
            self._interrupted.setdefault(q.name, []).append(job.msg_id)
            self._finish(job, Outcome.INTERRUPTED, started, None, handler)
            return
        except Exception as exc:  # noqa: BLE001 - any handler error is a job failure, never a worker crash
            await self._handle_failure(q, job, handler, exc, started)
        else:
            q.pending_acks.append(job.msg_id)
            assert self._ack_wake is not None
            self._ack_wake.set()
            self._finish(job, Outcome.SUCCEEDED, started, None, handler)
        finally:
            self._leases.pop(key, None)

    def _call_sync(self, handler: Handler, job: Job[Any]) -> None:
        try:
            handler.func(job)
        finally:
            with self._sync_lock:
                self._sync_running -= 1

    @property
    def sync_jobs_running(self) -> int:
        """Sync handlers still running in threads; after shutdown these were abandoned (threads cannot be killed)."""
        return self._sync_running

    def _finish(self, job: Job[Any], outcome: Outcome, started: float, error: BaseException | None, handler: Handler, **extra: Any) -> None:
        duration = time.perf_counter() - started
        self.observers.job_finished(job, outcome, duration, error)
        level = _OUTCOME_LEVELS[outcome]
        if logger.isEnabledFor(level):
            fields: dict[str, Any] = {
                "event": f"job_{outcome.value}",
                "queue": job.queue,
                "msg_id": job.msg_id,
                "attempt": job.attempt,
                "job_type": job.type,
                "handler": handler.name,
                "duration_s": round(duration, 6),
                "outcome": outcome.value,
                **extra,
            }
            if error is not None:
                fields["error"] = f"{type(error).__name__}: {error}"[:500]
            logger.log(level, fields["event"], extra=fields)

    async def _handle_failure(self, q: _QueueState, job: Job[Any], handler: Handler, exc: Exception, started: float) -> None:
        delay = q.config.retry.decide(job.attempt, exc)
        if delay is None:
            reason = "permanent_failure" if isinstance(exc, PermanentFailure) else "max_attempts"
            await self._give_up(q, job, handler, exc, reason, started)
            return
        try:
            await self._execute(_sql.RETRY_LATER, {"queue": q.name, "msg_id": job.msg_id, "delay": delay})
            due = time.monotonic() + delay
            if q.local_due is None or due < q.local_due:
                q.local_due = due
                q.wake.set()  # the fetch loop may be asleep with a later timer: re-plan, no query needed
        except DB_ERRORS as db_exc:
            self._db_failed("retry", db_exc, queue=q.name, msg_id=job.msg_id)
        self._finish(job, Outcome.RETRIED, started, exc, handler, retry_in_s=round(delay, 3))

    async def _give_up(self, q: _QueueState, job: Job[Any], handler: Handler, exc: BaseException, reason: str, started: float) -> None:
        try:
            await self._execute(
                _sql.dead_letter(q.name),
                {"queue": q.name, "dlq": dlq_name(q.name), "msg_id": job.msg_id, "error": Jsonb(_error_info(exc, reason))},
            )
        except DB_ERRORS as db_exc:
            # The message stays leased and comes back after its visibility timeout; nothing is lost.
            self._db_failed("dead_letter", db_exc, queue=q.name, msg_id=job.msg_id)
        self._finish(job, Outcome.DEAD_LETTERED, started, exc, handler, reason=reason)

    async def _reject(self, q: _QueueState, msg_id: int, read_ct: int, exc: BadMessage) -> None:
        """A message no handler accepts goes to the dead-letter queue at once: no retries, no loops."""
        try:
            await self._execute(
                _sql.dead_letter(q.name),
                {"queue": q.name, "dlq": dlq_name(q.name), "msg_id": msg_id, "error": Jsonb(_error_info(exc, exc.reason))},
            )
        except DB_ERRORS as db_exc:
            self._db_failed("dead_letter", db_exc, queue=q.name, msg_id=msg_id)
            return
        self.observers.message_rejected(q.name, msg_id, exc.reason)
        logger.error(
            "message_rejected",
            extra={"event": "message_rejected", "queue": q.name, "msg_id": msg_id, "attempt": read_ct, "reason": exc.reason, "error": exc.detail[:500]},
        )

    # -- acknowledgements -----------------------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        """Delete (or archive) finished messages in batches: one statement per queue per round."""
        assert self._ack_wake is not None
        failures = 0
        while True:
            await self._ack_wake.wait()
            # Linger a moment: a fetch loop about to read takes the acknowledgements along in its statement.
            await asyncio.sleep(ACK_LINGER)
            self._ack_wake.clear()
            ok = await self._ack_round()
            if self._ack_closing:
                return
            if ok:
                failures = 0
            else:
                failures += 1
                await asyncio.sleep(self._db_backoff(failures))
                self._ack_wake.set()

    async def _ack_round(self) -> bool:
        ok = True
        for q in self._queues.values():
            if not q.pending_acks:
                continue
            ids, q.pending_acks = q.pending_acks, []
            try:
                await self._execute(q.ack, (ids,))
            except DB_ERRORS as exc:
                q.pending_acks[:0] = ids
                self._db_failed("ack", exc, queue=q.name, pending=len(q.pending_acks))
                ok = False
            except BaseException:
                q.pending_acks[:0] = ids
                raise
        return ok

    async def _flush_acks(self, deadline: float) -> None:
        failures = 0
        while any(q.pending_acks for q in self._queues.values()):
            if await self._ack_round():
                return
            failures += 1
            if time.monotonic() >= deadline:
                lost = sum(len(q.pending_acks) for q in self._queues.values())
                logger.error("acks_unsent", extra={"event": "acks_unsent", "messages": lost, "note": "they will run again after their visibility timeout"})
                return
            await asyncio.sleep(self._db_backoff(failures))

    async def _hand_back_interrupted(self) -> None:
        for queue, ids in self._interrupted.items():
            if not ids:
                continue
            try:
                await self._execute(_sql.hand_back(queue), (ids,))
                logger.info("jobs_handed_back", extra={"event": "jobs_handed_back", "queue": queue, "msg_ids": ids})
            except DB_ERRORS as exc:
                self._db_failed("hand_back", exc, queue=queue, msg_ids=ids)
        self._interrupted.clear()

    # -- leases ---------------------------------------------------------------------------------------------

    def _add_lease(self, key: tuple[str, int], config: QueueConfig, task: asyncio.Task[Any] | None) -> _Lease:
        now = time.monotonic()
        lease = self._leases[key] = _Lease(config, key[1], now + config.visibility_timeout / 2, now + config.job_timeout, task)
        if lease.wake_at < self._lease_wake_at:
            assert self._lease_wake is not None
            self._lease_wake.set()
        return lease

    async def _lease_loop(self) -> None:
        """Renew the visibility timeout of jobs still running at half of it (one statement per queue), and
        cancel jobs that ran past their queue's job_timeout."""
        assert self._lease_wake is not None
        while True:
            if not self._leases:
                self._lease_wake_at = float("inf")
                await self._lease_wake.wait()
                self._lease_wake.clear()
                continue
            self._lease_wake_at = min(lease.wake_at for lease in self._leases.values())
            delay = self._lease_wake_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lease_wake.wait(), timeout=delay)
                self._lease_wake.clear()
                continue
            now = time.monotonic()
            self._cancel_overdue(now)
            await self._renew_due(now)

    def _cancel_overdue(self, now: float) -> None:
        for lease in self._leases.values():
            if not lease.timed_out and lease.deadline <= now and lease.task is not None:
                lease.timed_out = True
                lease.task.cancel()

    async def _renew_due(self, now: float) -> None:
        due: dict[str, list[_Lease]] = {}
        for lease in self._leases.values():
            if lease.renew_at <= now and not lease.timed_out:
                due.setdefault(lease.queue.name, []).append(lease)
        for queue, leases in due.items():
            config = leases[0].queue
            try:
                await self._execute(_sql.EXTEND_LEASES, {"queue": queue, "ids": [lease.msg_id for lease in leases], "vt": config.visibility_timeout})
                next_at = time.monotonic() + config.visibility_timeout / 2
                logger.debug("leases_renewed", extra={"event": "leases_renewed", "queue": queue, "msg_ids": [lease.msg_id for lease in leases]})
            except DB_ERRORS as exc:
                self._db_failed("renew_lease", exc, queue=queue)
                next_at = time.monotonic() + min(1.0, config.visibility_timeout / 4)
            for lease in leases:
                lease.renew_at = next_at


class _ListenWatcher(WorkerObserver):
    """Forwards the listener's events to the worker's observers and adjusts the worker's sleep plans."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def listen_state(self, connected: bool) -> None:
        self._worker.observers.listen_state(connected)
        if not connected:
            self._worker._on_listen_lost()

    def notification(self, queue: str) -> None:
        self._worker.observers.notification(queue)

    def db_error(self, operation: str, error: BaseException) -> None:
        self._worker.observers.db_error(operation, error)


async def run_worker(app: App, conninfo: str, config: WorkerConfig | None = None, *, observers: Iterable[WorkerObserver] = (), stop_when_idle: bool = False) -> Worker:
    """Convenience: build a :class:`Worker`, run it, return it (for its health and counters)."""
    worker = Worker(app, conninfo, config, observers=observers)
    await worker.run(stop_when_idle=stop_when_idle)
    return worker


__all__ = ["JobTimeout", "Worker", "WorkerCrashed", "WorkerHealth", "run_worker"]
