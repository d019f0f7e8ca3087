"""The worker: wires its parts together, starts them, watches them, and shuts them down.

- :mod:`._fetcher`: a fetch loop per queue (drain, plan the sleep, wait) and the fallback poll;
- :mod:`._executor`: runs one delivery (handler, timeout, lost lease, poison suspects) to its outcome;
- :mod:`._completer`: the fenced outcome writes (batched acknowledgements, retries, dead letters, hand-backs);
- :mod:`._leases`: holds every delivery from its read to its outcome, renews it, stops the job if it is lost;
- :mod:`._listener`: the LISTEN connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg

from . import _sql
from ._app import App
from ._completer import Completer
from ._config import WorkerConfig
from ._db import DB_ERRORS, Database, Row, WorkerHealth, connection_kwargs
from ._events import ObserverGroup, WakeupSource, WorkerObserver
from ._executor import Executor, JobTimeout
from ._fetcher import Fetchers, QueueFetcher
from ._install import SetupError, check_setup, install
from ._leases import Lease, LeaseKeeper
from ._listener import Listener
from ._slots import Slots

logger = logging.getLogger(__name__)


T = TypeVar("T")

# The server's own word that this database can never work as configured: retrying cannot help.
_PERMANENT_SQLSTATES = {"3D000", "28000", "28P01"}  # no such database; role / authorization; bad password
_PERMANENT_TEXT = ("does not exist", "password authentication failed", "no pg_hba.conf entry")


def _is_permanent(exc: BaseException) -> bool:
    if not isinstance(exc, psycopg.Error):
        return False
    if getattr(exc, "sqlstate", None) in _PERMANENT_SQLSTATES:
        return True
    if isinstance(exc, psycopg.OperationalError):
        text = str(exc)
        return "FATAL" in text and any(t in text for t in _PERMANENT_TEXT)
    return isinstance(exc, psycopg.ProgrammingError)  # a malformed connection string


class WorkerCrashed(RuntimeError):
    """A background task of the worker died; the worker stopped instead of limping on."""


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
        """``listen_conninfo``: where the LISTEN connection goes, if not to ``conninfo``."""
        app.validate()
        self.app = app
        self.conninfo = conninfo
        self.listen_conninfo = listen_conninfo or conninfo
        self.config = config or WorkerConfig()
        self.observers = ObserverGroup(list(observers))
        self.health = WorkerHealth(listening=None if not self.config.listen else False)
        self._stop: asyncio.Event | None = None
        self._db: Database | None = None
        self._slots: Slots | None = None
        self._executor: Executor | None = None
        self._leases: LeaseKeeper | None = None
        self._fetchers: Fetchers | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    # -- public ---------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin a graceful shutdown: stop reading, let jobs finish within the grace period, hand back the rest."""
        self.health.stopping = True
        if self._stop is not None:
            self._stop.set()
        if self._fetchers is not None:
            for q in self._fetchers.queues.values():
                q.wake.set()

    @property
    def in_flight(self) -> int:
        return 0 if self._slots is None else self._slots.busy

    @property
    def listener(self) -> Listener | None:
        return None if self._fetchers is None else self._fetchers.listener

    @property
    def sync_jobs_running(self) -> int:
        """Sync handlers still running in threads; after shutdown these were abandoned (threads cannot be killed)."""
        return 0 if self._executor is None else self._executor.sync_running

    async def ping_database(self) -> None:
        """One ``SELECT 1`` through the worker's pool (used by readiness when nothing else shows the database)."""
        assert self._db is not None
        await self._db.execute("SELECT 1")

    async def run(self, *, stop_when_idle: bool = False) -> None:
        self._stop = stop = asyncio.Event()
        if self.health.stopping:
            stop.set()
        queues = self.app.queues
        self._db = db = Database(self.conninfo, self.config, self.observers, self.health, max_size=len(queues) + 3)
        self._slots = slots = Slots(self.config.concurrency)
        self._leases = leases = LeaseKeeper(db, self.observers)
        completer = Completer(db, leases, dict(queues))
        # Reads default to half the concurrency, so one batch runs while the next is being read.
        default_batch = max(1, min(100, self.config.concurrency // 2))
        fetch_states = {name: QueueFetcher(cfg, cfg.batch_size or default_batch) for name, cfg in queues.items()}
        threads = ThreadPoolExecutor(self.config.thread_pool_size, thread_name_prefix="pg-worker-job")
        self._executor = executor = Executor(
            self.app, leases, completer, self.observers, self.health, threads, on_retry=lambda queue, delay: fetch_states[queue].retry_scheduled(delay)
        )
        self._fetchers = fetchers = Fetchers(self.config, fetch_states, db, slots, leases, completer, self.observers, stop, self._start_job)
        try:
            if not await self._start_up(db):
                return
            await self._supervise(stop_when_idle, leases, completer, executor, fetchers)
        finally:
            threads.shutdown(wait=False, cancel_futures=True)
            await db.close()

    def _start_job(self, lease: Lease, row: Row) -> None:
        task = lease.task = asyncio.create_task(self._run_job(lease, row))
        self._jobs.add(task)

    async def _run_job(self, lease: Lease, row: Row) -> None:
        """One job's task. The bookkeeping is done in it, not in a done callback (a closure, a scheduled handle
        and one more trip through the event loop for every job)."""
        assert self._executor is not None and self._slots is not None and self._leases is not None
        try:
            await self._executor.run(lease, row[2], row[3], row[4])
        except Exception as exc:  # noqa: BLE001 - any escape from the executor is a bug of ours, logged
            # A bug of ours, not the handler's (those are job failures): stop renewing, so the message comes
            # back after its lease, and say so.
            self._leases.release(lease)
            logger.error("job_task_failed", extra={"event": "job_task_failed", "queue": lease.queue.name, "msg_id": lease.msg_id, "error": repr(exc)})
        finally:
            self._jobs.discard(lease.task)
            self._slots.give(1)

    # -- start-up -------------------------------------------------------------------------------------------

    async def _start_up(self, db: Database) -> bool:
        """Connect (once directly, so that a failure says libpq's reason at once), check or create queues and
        wakeup triggers, then open the pool. A database that can never work (missing, bad credentials) is a
        :class:`SetupError` at once; an unreachable one is retried with backoff until it answers or we stop."""
        assert self._stop is not None
        failures = 0
        while not self._stop.is_set():
            try:
                problems = await self._until_stopped(self._check_database())
                if problems is None:
                    return False
                if problems:
                    if not self.config.auto_install:
                        raise SetupError("database not ready: " + "; ".join(problems) + " (run `pg-worker install`)")
                    logger.info("auto_install", extra={"event": "auto_install", "problems": problems})
                    await install(self.conninfo, self.app.queues)
                await db.open()
                self.health.started = True
                logger.info(
                    "worker_started",
                    extra={
                        "event": "worker_started",
                        "worker_id": self.config.worker_id,
                        "queues": list(self.app.queues),
                        "concurrency": self.config.concurrency,
                        "listen": self.config.listen,
                    },
                )
                return True
            except DB_ERRORS as exc:
                if _is_permanent(exc):
                    raise SetupError(f"cannot use the database: {str(exc).strip()}") from exc
                failures += 1
                delay = db.backoff(failures)
                db.failed("startup", exc, retry_in=round(delay, 3), attempt=failures)
                await self._until_stopped(asyncio.sleep(delay))
        return False

    async def _check_database(self) -> list[str]:
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, **connection_kwargs(self.config)) as conn:
            async with conn.transaction():
                problems = await check_setup(conn, self.app.queues)
                if self.config.listen and not problems:
                    await conn.execute(_sql.DELETE_STALE_MARKS)
            return problems

    async def _until_stopped(self, work: Coroutine[Any, Any, T]) -> T | None:
        """``work``'s result, or None as soon as a stop is requested (SIGINT during start-up ends at once)."""
        assert self._stop is not None
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return None

    # -- supervision ----------------------------------------------------------------------------------------

    async def _supervise(self, stop_when_idle: bool, leases: LeaseKeeper, completer: Completer, executor: Executor, fetchers: Fetchers) -> None:
        assert self._stop is not None
        side: dict[asyncio.Task[Any], str] = {}
        if self.config.listen:
            listener = fetchers.listener = Listener(
                self.listen_conninfo,
                fetchers.queues,
                on_notify=self._on_notify,
                on_connected=self._on_listen_connected,
                observer=_ListenWatcher(self),
                reconnect_max=self.config.listen_reconnect_max,
                degraded_poll_interval=self.config.degraded_poll_interval,
                connect_kwargs=connection_kwargs(self.config),
                worker_id=self.config.worker_id,
            )
            listen_task = asyncio.create_task(listener.run(), name="pg-worker-listen")
            side[listen_task] = "listener"
            # LISTEN before the first drain, so nothing sent in between goes unnoticed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.first_attempt_done.wait(), timeout=10.0)
            if listen_task.done():
                listen_task.result()  # e.g. the worker id is taken: refuse to start, before reading anything
        ack_task = asyncio.create_task(completer.run(), name="pg-worker-ack")
        side[ack_task] = "acknowledger"
        side[asyncio.create_task(fetchers.run_poll(), name="pg-worker-poll")] = "poller"
        side[asyncio.create_task(self._heartbeat(), name="pg-worker-heartbeat")] = "heartbeat"
        side[asyncio.create_task(leases.run(), name="pg-worker-lease")] = "lease keeper"
        fetch_tasks = {
            asyncio.create_task(fetchers.run_queue(q, stop_when_idle), name=f"pg-worker-fetch-{q.name}"): q.name
            for q in fetchers.queues.values()
        }
        crashed: BaseException | None = None
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            watched: set[asyncio.Task[Any]] = {*side, *fetch_tasks, stop_wait}
            while True:
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if stop_wait in done:
                    break
                for task in done:
                    watched.discard(task)
                    error = None if task.cancelled() else task.exception()
                    if task in fetch_tasks and error is None:
                        continue  # stop_when_idle: this queue is done
                    what = side.get(task) or f"fetch loop of {fetch_tasks.get(task)}"
                    crashed = error or RuntimeError(f"{what} ended unexpectedly")
                    self.health.crashed = f"{what}: {crashed!r}"
                    logger.critical("worker_task_died", extra={"event": "worker_task_died", "task": what, "error": repr(crashed)}, exc_info=crashed)
                    self.request_stop()
                if stop_when_idle and not (watched & set(fetch_tasks)):
                    self.request_stop()
        finally:
            await self._shut_down(fetch_tasks, side, stop_wait, ack_task, completer, executor, fetchers)
        if crashed is not None:
            raise WorkerCrashed(str(crashed)) from crashed

    async def _shut_down(
        self,
        fetch_tasks: dict[asyncio.Task[None], str],
        side: dict[asyncio.Task[Any], str],
        stop_wait: asyncio.Task[Any],
        ack_task: asyncio.Task[None],
        completer: Completer,
        executor: Executor,
        fetchers: Fetchers,
    ) -> None:
        assert self._slots is not None and self._stop is not None and self._db is not None
        self._stop.set()
        self._slots.close()
        for q in fetchers.queues.values():
            q.wake.set()
        await asyncio.wait(list(fetch_tasks), timeout=5.0)
        for task in fetch_tasks:
            task.cancel()
        jobs = list(self._jobs)
        if jobs:
            logger.info("shutdown_waiting_for_jobs", extra={"event": "shutdown_waiting_for_jobs", "jobs": len(jobs), "grace_s": self.config.shutdown_grace})
            _, still_running = await asyncio.wait(jobs, timeout=self.config.shutdown_grace)
            executor.shutting_down = True
            for task in still_running:
                task.cancel()
            if still_running:
                await asyncio.wait(still_running, timeout=5.0)
        # Let the acknowledger finish the round it is in (cancelling it mid-statement could lose a batch of
        # acknowledgements), then send what is left from here.
        completer.begin_close()
        await asyncio.wait([ack_task], timeout=10.0)
        await completer.flush(deadline=time.monotonic() + 10.0)
        await completer.hand_back([*executor.interrupted, *fetchers.unstarted])
        if self.config.listen:
            try:
                await self._db.execute(_sql.UNMARK_WORKER, (self.config.worker_id,))
            except DB_ERRORS as exc:
                self._db.failed("unmark", exc)
        for task in (*side, stop_wait):
            task.cancel()
        await asyncio.gather(*fetch_tasks, *side, stop_wait, return_exceptions=True)
        logger.info("worker_stopped", extra={"event": "worker_stopped", "worker_id": self.config.worker_id})

    async def _heartbeat(self) -> None:
        """Proves to the liveness probe (another thread) that this event loop is not blocked. No I/O."""
        while True:
            self.health.last_tick = time.monotonic()
            await asyncio.sleep(1.0)

    # -- wakeups --------------------------------------------------------------------------------------------

    def _wake(self, queue: str, source: WakeupSource) -> None:
        if self._fetchers is not None and queue in self._fetchers.queues:
            self._fetchers.queues[queue].wake_up(source)

    def _on_notify(self, queue: str) -> None:
        self.health.last_notification = time.monotonic()
        self._wake(queue, WakeupSource.NOTIFY)

    def _on_listen_connected(self, pid: int) -> None:
        self.health.listening = True
        self.health.listen_down_since = None
        for name in self.app.queues:
            self._wake(name, WakeupSource.RECONNECT)

    def _on_listen_lost(self) -> None:
        if self.health.listening:
            self.health.listen_down_since = time.monotonic()
        self.health.listening = False
        if self._fetchers is not None:
            self._fetchers.poll_now.set()  # poll at once, then at the degraded interval until LISTEN is back


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
