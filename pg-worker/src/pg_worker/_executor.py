"""Running one delivery: the handler call (async, sync in a thread, or returning an awaitable), its timeout
from a clock, its stop when the lease is lost, and the outcome it leads to.

Poison messages: a message whose previous delivery ended with no outcome (its worker died, or lost the
lease) is a suspect. Suspects run alone in this process, after a fenced mark that says so; a suspect whose
previous delivery was such a solo run killed its worker while nothing else ran, and after
``POISON_DEATHS`` of those it goes to the dead-letter queue. Its batch-mates, innocent, run alone once each
and succeed: a crash or a deploy's SIGKILL never pushes them to the dead-letter queue.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import _sql
from ._app import App, BadMessage, Handler, Job
from ._completer import Completer, error_info
from ._db import WorkerHealth
from ._events import Outcome, WorkerObserver
from ._leases import Lease, LeaseKeeper
from ._retry import PermanentFailure

logger = logging.getLogger(__name__)

POISON_DEATHS = 2

# Successes are counted in metrics; logging each one at INFO would cost more than a no-op job itself.
_OUTCOME_LEVELS = {
    Outcome.SUCCEEDED: logging.DEBUG,
    Outcome.INTERRUPTED: logging.INFO,
    Outcome.RETRIED: logging.WARNING,
    Outcome.FAILED: logging.ERROR,
    Outcome.DEAD_LETTERED: logging.ERROR,
    Outcome.LEASE_LOST: logging.WARNING,
}


class JobTimeout(Exception):
    """The job ran past its queue's ``job_timeout``."""

    __module__ = "pg_worker"  # its public name, as the dead-letter queue records it


class HandlerReturnedValue(PermanentFailure, TypeError):
    """A handler returned something that is neither ``None`` nor awaitable: a programming error that trying
    again cannot mend, so the message goes to the dead-letter queue (to be replayed once the code is fixed)."""


class Interrupted(Exception):
    """Shutdown stopped the job; its message is handed back."""

    def __init__(self, abandoned_thread: bool = False) -> None:
        super().__init__("interrupted by shutdown")
        self.abandoned_thread = abandoned_thread


class _LeaseLost(Exception):
    pass


def _int_header(headers: Any, key: str) -> int | None:
    if headers is None or not isinstance(headers, Mapping):  # None first: most messages have no headers
        return None
    value = headers.get(key)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def public_headers(headers: Any) -> Any:
    if headers is not None and isinstance(headers, Mapping) and any(key in headers for key in _sql.INTERNAL_HEADERS):
        return {k: v for k, v in headers.items() if k not in _sql.INTERNAL_HEADERS}
    return headers


class _SoloGate:
    """Readers-writer gate: ordinary jobs share it, a suspect takes it alone (and is preferred)."""

    def __init__(self) -> None:
        self.running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._solo = asyncio.Lock()
        self._open = asyncio.Event()
        self._open.set()
        self._waiting_solo = 0

    async def enter(self) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self.running += 1
        self._idle.clear()

    def leave(self) -> None:
        self.running -= 1
        if self.running == 0:
            self._idle.set()

    async def enter_solo(self) -> None:
        self._waiting_solo += 1
        self._open.clear()
        try:
            await self._solo.acquire()
            await self._idle.wait()
        except BaseException:
            self._waiting_solo -= 1
            if self._solo.locked():
                self._solo.release()
            if self._waiting_solo == 0:
                self._open.set()
            raise

    def leave_solo(self) -> None:
        self._waiting_solo -= 1
        self._solo.release()
        if self._waiting_solo == 0:
            self._open.set()


class Executor:
    def __init__(
        self,
        app: App,
        leases: LeaseKeeper,
        completer: Completer,
        observers: WorkerObserver,
        health: WorkerHealth,
        threads: ThreadPoolExecutor,
        on_retry: Callable[[str, float], None],
    ) -> None:
        self._app = app
        self._leases = leases
        self._completer = completer
        self._observers = observers
        self._health = health
        self._threads = threads
        self._on_retry = on_retry
        self._gate = _SoloGate()
        self._sync_lock = threading.Lock()
        self.sync_running = 0
        self.shutting_down = False
        self.interrupted: list[Lease] = []

    async def run(self, lease: Lease, enqueued_at: Any, message: Any, headers: Any) -> None:
        queue = lease.queue.name
        try:
            handler, job_type = self._app.resolve(queue, message)
            payload = handler.parse(message)
        except BadMessage as exc:
            await self._reject(lease, exc)
            return
        attempt = lease.read_ct - (_int_header(headers, _sql.HANDBACKS_KEY) or 0)
        job: Job[Any] = Job(queue, lease.msg_id, max(attempt, 1), enqueued_at, payload, job_type, public_headers(headers))
        solo = self._is_suspect(lease, headers)
        if solo:
            # Solo starts so far: each followed a delivery that ended with no outcome (a dead worker, a lost lease).
            solo_starts = _int_header(headers, _sql.SOLO_KEY) or 0
            if solo_starts >= POISON_DEATHS:
                error = RuntimeError(f"the worker died (or lost the lease) {solo_starts} times while running this message alone")
                await self._give_up(lease, job, handler, error, "killed_worker", time.perf_counter())
                return
        try:
            await (self._gate.enter_solo() if solo else self._gate.enter())
        except asyncio.CancelledError:
            if not self.shutting_down:
                raise
            self.interrupted.append(lease)  # never started: handed back at shutdown
            return
        try:
            # What finished before must be on record before a suspect runs: if it kills the process, the
            # jobs that succeeded next to it must not come back as suspects themselves.
            if solo and not (await self._completer.flush(time.monotonic() + 5.0) and await self._mark_solo(lease, job)):
                self._leases.release(lease)  # the database failed: the message comes back after its lease
                return
            await self._execute(lease, job, handler)
        finally:
            if solo:
                self._gate.leave_solo()
            else:
                self._gate.leave()

    @staticmethod
    def _is_suspect(lease: Lease, headers: Any) -> bool:
        """The previous delivery ended without a recorded outcome (retry or hand-back)."""
        return lease.read_ct > 1 and _int_header(headers, _sql.CLOSED_KEY) != lease.read_ct - 1

    async def _mark_solo(self, lease: Lease, job: Job[Any]) -> bool:
        logger.warning(
            "job_running_alone",
            extra={"event": "job_running_alone", "queue": job.queue, "msg_id": job.msg_id, "attempt": job.attempt, "why": "its previous delivery ended with no outcome (worker died or lease lost)"},
        )
        return bool(await self._completer.mark_solo(lease))

    # -- the handler ----------------------------------------------------------------------------------------

    async def _execute(self, lease: Lease, job: Job[Any], handler: Handler) -> None:
        task = lease.task or asyncio.current_task()  # set by the worker: current_task() costs a getpid() here
        assert task is not None
        if handler.is_async:

            def stop_job(_lease: Lease) -> None:
                task.cancel("lease lost")

            lease.on_lost = stop_job
        self._observers.job_started(job, max(0.0, time.time() - job.enqueued_at.timestamp()))
        started = time.perf_counter()
        try:
            try:
                if handler.is_async:
                    await self._run_async(lease, job, handler, task)
                else:
                    await self._run_sync(lease, job, handler)
            except asyncio.CancelledError:
                if self.shutting_down:
                    raise Interrupted() from None
                if lease.held:
                    raise
                task.uncancel()
                raise _LeaseLost() from None
        except Interrupted as exc:
            if not exc.abandoned_thread:
                self.interrupted.append(lease)
            self._finish(job, Outcome.INTERRUPTED, started, None, handler, **({"note": "sync handler still running: its message stays leased until the visibility timeout"} if exc.abandoned_thread else {}))
            return
        except _LeaseLost:
            self._finish(job, Outcome.LEASE_LOST, started, None, handler, why=lease.lost)
            return
        except Exception as exc:  # noqa: BLE001 - any handler error is a job failure, never a worker crash
            if not lease.held:
                self._finish(job, Outcome.LEASE_LOST, started, exc, handler, why=lease.lost)
                return
            await self._handle_failure(lease, job, handler, exc, started)
            return
        if not lease.held:
            self._finish(job, Outcome.LEASE_LOST, started, None, handler, why=lease.lost)
            return
        lease.on_lost = None
        self._completer.ack(lease)
        self._finish(job, Outcome.SUCCEEDED, started, None, handler)

    async def _run_async(self, lease: Lease, job: Job[Any], handler: Handler, task: asyncio.Task[Any]) -> None:
        # The timeout is kept by the lease clock (one timer for every job, not one per job); a TimeoutError
        # the handler raises itself (a slow router) is an ordinary failure, never taken for ours.
        timed_out = False

        def time_out(_lease: Lease) -> None:
            nonlocal timed_out
            timed_out = True
            task.cancel("job timeout")

        self._leases.set_deadline(lease, lease.queue.job_timeout, time_out)
        try:
            func: Any = handler.func
            result = func(job)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            if not timed_out:
                raise
            task.uncancel()
            raise JobTimeout(f"job exceeded job_timeout of {lease.queue.job_timeout:g}s") from None
        finally:
            self._leases.clear_deadline(lease)
        _check_result(handler, result)

    async def _run_sync(self, lease: Lease, job: Job[Any], handler: Handler) -> None:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        future = loop.run_in_executor(self._threads, functools.partial(self._call_sync, handler, job, loop, started))
        # The timeout counts from the moment a thread runs the handler: a job queued behind a pool of stuck
        # threads has not started, so it cannot have timed out.
        waiter = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait([waiter, future], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            waiter.cancel()
            if not started.is_set() and future.cancel():
                raise
            raise Interrupted(abandoned_thread=not future.done()) from None
        waiter.cancel()
        timed_out = False
        try:
            try:
                result = await asyncio.wait_for(asyncio.shield(future), timeout=lease.queue.job_timeout)
            except TimeoutError:
                # A thread cannot be stopped. Keep the lease (the keeper renews it) until it returns, so the
                # message never runs twice at once; meanwhile liveness reports the stuck thread.
                timed_out = True
                self._health.stuck_sync_jobs += 1
                logger.error(
                    "sync_job_stuck",
                    extra={"event": "sync_job_stuck", "queue": job.queue, "msg_id": job.msg_id, "attempt": job.attempt, "job_timeout_s": lease.queue.job_timeout},
                )
                try:
                    result = await asyncio.shield(future)
                finally:
                    self._health.stuck_sync_jobs -= 1
        except asyncio.CancelledError:
            if self.shutting_down:
                raise Interrupted(abandoned_thread=not future.done()) from None
            raise
        if timed_out:
            raise JobTimeout(f"job exceeded job_timeout of {lease.queue.job_timeout:g}s (the thread returned later)")
        if inspect.isawaitable(result):
            result = await result  # e.g. a lambda that returns a coroutine: run it here, on the loop
        _check_result(handler, result)

    def _call_sync(self, handler: Handler, job: Job[Any], loop: asyncio.AbstractEventLoop, started: asyncio.Event) -> Any:
        with self._sync_lock:
            self.sync_running += 1
        loop.call_soon_threadsafe(started.set)
        try:
            return handler.func(job)
        finally:
            with self._sync_lock:
                self.sync_running -= 1

    # -- outcomes -------------------------------------------------------------------------------------------

    def _finish(self, job: Job[Any], outcome: Outcome, started: float, error: BaseException | None, handler: Handler, **extra: Any) -> None:
        duration = time.perf_counter() - started
        self._observers.job_finished(job, outcome, duration, error)
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

    async def _handle_failure(self, lease: Lease, job: Job[Any], handler: Handler, exc: Exception, started: float) -> None:
        delay = lease.queue.retry.decide(job.attempt, exc)
        if delay is None:
            reason = "permanent_failure" if isinstance(exc, PermanentFailure) else "max_attempts"
            await self._give_up(lease, job, handler, exc, reason, started)
            return
        written = await self._completer.retry(lease, delay)
        if written is False:
            self._finish(job, Outcome.LEASE_LOST, started, exc, handler, why=lease.lost, operation="retry")
            return
        if written is None:  # the database failed: the message comes back after its lease instead
            self._finish(job, Outcome.FAILED, started, exc, handler, retry_in_s=round(delay, 3))
            return
        self._on_retry(job.queue, delay)
        self._finish(job, Outcome.RETRIED, started, exc, handler, retry_in_s=round(delay, 3))

    async def _give_up(self, lease: Lease, job: Job[Any], handler: Handler, exc: BaseException, reason: str, started: float) -> None:
        written = await self._completer.dead_letter(lease, error_info(exc, reason))
        if written is False:
            self._finish(job, Outcome.LEASE_LOST, started, exc, handler, why=lease.lost, operation="dead_letter")
            return
        # Counted as failed either way; dead-lettered only when the move was written.
        self._finish(job, Outcome.DEAD_LETTERED if written else Outcome.FAILED, started, exc, handler, reason=reason)

    async def _reject(self, lease: Lease, exc: BadMessage) -> None:
        """A message no handler accepts goes to the dead-letter queue at once: no retries, no loops."""
        written = await self._completer.dead_letter(lease, error_info(exc, exc.reason))
        if not written:
            return
        self._observers.message_rejected(lease.queue.name, lease.msg_id, exc.reason)
        logger.error(
            "message_rejected",
            extra={"event": "message_rejected", "queue": lease.queue.name, "msg_id": lease.msg_id, "attempt": lease.read_ct, "reason": exc.reason, "error": exc.detail[:500]},
        )


def _check_result(handler: Handler, result: Any) -> None:
    if result is not None:
        raise HandlerReturnedValue(
            f"handler {handler.name} returned {type(result).__name__}; a handler must return None or an awaitable "
            "(was the work it returns ever run?)"
        )
