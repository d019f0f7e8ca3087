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
from collections.abc import AsyncGenerator, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import psycopg

from . import _sql
from ._app import App, LifespanFunc, WorkerFailure, _callable_name
from ._completer import Completer
from ._config import WorkerConfig
from ._db import DB_ERRORS, Database, Row, WorkerHealth, connection_kwargs
from ._events import ObserverGroup, WakeupSource, WorkerObserver
from ._executor import Executor, JobTimeout
from ._fetcher import Fetchers, QueueFetcher
from ._install import SetupError, check_setup, install
from ._leases import Lease, LeaseKeeper, expiry_margin
from ._listener import Listener
from ._slots import Slots

logger = logging.getLogger(__name__)


T = TypeVar("T")

HEARTBEAT = 0.25
# The event loop blocked longer than this (or than the shortest lease margin) is logged and counted.
LOOP_BLOCKED_BOUND = 0.5

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
        self._background: dict[asyncio.Task[None], str] = {}
        #: Why the worker stopped with a failure (:meth:`stop`), or None.
        self.failure: str | None = None

    # -- public ---------------------------------------------------------------------------------------------

    def stop(self, failure: str | None = None) -> None:
        """Begin a graceful shutdown; with ``failure``, :meth:`run` then raises :class:`WorkerFailure` with it
        (``pg-worker run`` exits with status 1). The first failure given is the one reported."""
        if failure is not None and self.failure is None:
            self.failure = failure
            logger.error("worker_failure", extra={"event": "worker_failure", "worker_id": self.config.worker_id, "reason": failure})
        self.request_stop()

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
        self._slots = slots = Slots(self._capacity())
        # Reads default to half the concurrency, so one batch runs while the next is being read.
        default_batch = max(1, min(100, self.config.concurrency // 2))
        fetch_states = {name: QueueFetcher(cfg, cfg.batch_size or default_batch) for name, cfg in queues.items()}
        self._leases = leases = LeaseKeeper(db, self.observers)
        # A delivery that ended with no outcome (lease run out, outcome not written) is visible again at its
        # lease's end: its fetch loop looks then, not at the next fallback poll.
        leases.on_ended = lambda lease, delay: fetch_states[lease.queue.name].retry_scheduled(delay)
        # A retry this worker wrote wakes its fetch loop when it is due (another worker's is found by the poll).
        completer = Completer(db, leases, dict(queues), on_retry=lambda queue, delay: fetch_states[queue].retry_scheduled(delay))
        threads = ThreadPoolExecutor(self.config.thread_pool_size, thread_name_prefix="pg-worker-job")
        self._executor = executor = Executor(self.app, leases, completer, self.observers, self.health, threads)
        completer.on_acked = executor.acked
        self._fetchers = fetchers = Fetchers(self.config, fetch_states, db, slots, leases, completer, self.observers, stop, self._start_job)
        try:
            if await self._start_up(db):
                async with contextlib.AsyncExitStack() as lifespans:
                    for func in self.app.lifespans:
                        if not await self._enter_lifespan(lifespans, func):
                            break
                    else:
                        await self._supervise(stop_when_idle, leases, completer, executor, fetchers)
        finally:
            threads.shutdown(wait=False, cancel_futures=True)
            await db.close()
        if self.failure is not None:
            raise WorkerFailure(self.failure)

    async def _enter_lifespan(self, stack: contextlib.AsyncExitStack, func: LifespanFunc) -> bool:
        """Run a lifespan up to its ``yield`` and schedule the rest for exit; False (and a failure) if it failed."""
        name = _callable_name(func)
        gen = cast(AsyncGenerator[None, None], func(self.app))  # App.lifespan accepts async generators only
        try:
            await anext(gen)
        except StopAsyncIteration:
            self.stop(failure=f"lifespan {name} ended without yielding")
            return False
        except WorkerFailure as exc:
            self.stop(failure=f"lifespan {name}: {exc}")
            return False
        except Exception as exc:
            logger.exception("lifespan_failed", extra={"event": "lifespan_failed", "lifespan": name, "stage": "start"})
            self.stop(failure=f"lifespan {name} failed at start: {type(exc).__name__}: {exc}")
            return False

        async def leave() -> None:
            try:
                await anext(gen)
            except StopAsyncIteration:
                return
            except Exception as exc:
                logger.exception("lifespan_failed", extra={"event": "lifespan_failed", "lifespan": name, "stage": "exit"})
                self.stop(failure=f"lifespan {name} failed at exit: {type(exc).__name__}: {exc}")
                return
            await gen.aclose()
            self.stop(failure=f"lifespan {name} yielded more than once")

        stack.push_async_callback(leave)
        return True

    def _capacity(self) -> int:
        """How many jobs may be read at once. With sync handlers only, no more than there are threads: a job
        read before a thread is free would wait holding its lease, which another worker could use meanwhile."""
        handlers = [h for by_type in self.app._handlers.values() for h in by_type.values()]
        if handlers and not any(h.is_async for h in handlers):
            return min(self.config.concurrency, self.config.thread_pool_size)
        return self.config.concurrency

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
            self._leases.abandon(lease)
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
        self._background = {
            asyncio.create_task(self._background_task(name, func), name=f"pg-worker-task-{name}"): name
            for name, func in self.app.background_tasks.items()
        }
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
        await self._stop_background()
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
        # A graceful stop is not a crash: the next delivery of an abandoned sync job is no poison suspect.
        await completer.hand_back(executor.abandoned, abandoned=True)
        if self.config.listen:
            try:
                await self._db.execute(_sql.UNMARK_WORKER, (self.config.worker_id,))
            except DB_ERRORS as exc:
                self._db.failed("unmark", exc)
        for task in (*side, stop_wait):
            task.cancel()
        await asyncio.gather(*fetch_tasks, *side, stop_wait, return_exceptions=True)
        logger.info("worker_stopped", extra={"event": "worker_stopped", "worker_id": self.config.worker_id})

    async def _background_task(self, name: str, func: Any) -> None:
        """Runs one of the app's background tasks; its failure stops the worker (never a silent death)."""
        try:
            await func(self.app)
        except WorkerFailure as exc:
            self.stop(failure=f"background task {name}: {exc}")
        except Exception as exc:
            logger.exception("background_task_failed", extra={"event": "background_task_failed", "task": name, "error": repr(exc)})
            self.stop(failure=f"background task {name} failed: {type(exc).__name__}: {exc}")
        else:
            logger.info("background_task_finished", extra={"event": "background_task_finished", "task": name})

    async def _stop_background(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=10.0)
            for task in pending:
                logger.error("background_task_stuck", extra={"event": "background_task_stuck", "task": self._background[task], "note": "did not end within 10s of its cancellation"})

    async def _heartbeat(self) -> None:
        """Proves to the liveness probe (another thread) that this event loop is not blocked, and says so when it
        was: a handler that blocks the loop also blocks the lease clock, so its message may run elsewhere
        meanwhile (docs/delivery.md). No I/O."""
        # Past the lease margin, a blocked loop can outlast a lease before its timer gets to stop the job.
        bound = min([LOOP_BLOCKED_BOUND, *(expiry_margin(q.visibility_timeout) for q in self.app.queues.values())])
        while True:
            before = self.health.last_tick = time.monotonic()
            await asyncio.sleep(HEARTBEAT)
            blocked = time.monotonic() - before - HEARTBEAT
            if blocked > bound:
                self.observers.event_loop_blocked(blocked)
                logger.warning(
                    "event_loop_blocked",
                    extra={
                        "event": "event_loop_blocked",
                        "blocked_s": round(blocked, 3),
                        "bound_s": round(bound, 3),
                        "note": "a handler blocked the event loop (blocking I/O or CPU work in an async def?): leases cannot be renewed meanwhile; run it in a thread",
                    },
                )

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


__all__ = ["JobTimeout", "Worker", "WorkerCrashed", "WorkerFailure", "WorkerHealth", "run_worker"]
