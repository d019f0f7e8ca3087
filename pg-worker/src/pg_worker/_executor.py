"""Running one delivery: the handler call (async, sync in a thread, or returning an awaitable), its timeout
from a clock, its stop when the lease is lost, and the outcome it leads to.

Poison messages: a message whose previous delivery ended with no outcome (its worker died, or lost the
lease) is a suspect. Suspects run one at a time in this process (the suspect lane), after a fenced mark that
says so; ordinary jobs, on every queue, go on running beside them, so a suspect never stalls the worker. A
suspect whose previous delivery was such a marked run killed its worker while it was the only suspect
running, and after ``POISON_DEATHS`` of those it goes to the dead-letter queue. The ordinary jobs that died
with it come back as suspects themselves and run through the lane once each: innocent, they succeed, so a
crash or a deploy's SIGKILL never pushes them to the dead-letter queue. (An innocent suspect is blamed only if
the process dies twice while it is the one in the lane: two fresh poison messages, or two SIGKILLs, in that
window.)
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import _sql
from ._app import App, BadMessage, Handler, Job
from ._completer import Completer, error_info
from ._db import WorkerHealth
from ._events import Outcome, WorkerObserver
from ._leases import Lease, LeaseKeeper
from ._retry import PermanentFailure, RetryLater

logger = logging.getLogger(__name__)

POISON_DEATHS = 2

# Successes are counted in metrics; logging each one at INFO would cost more than a no-op job itself.
_OUTCOME_LEVELS = {
    Outcome.SUCCEEDED: logging.DEBUG,
    Outcome.INTERRUPTED: logging.INFO,
    Outcome.RETRIED: logging.WARNING,
    Outcome.DEFERRED: logging.INFO,  # asked for by the handler (a busy resource): not a failure
    Outcome.FAILED: logging.ERROR,
    Outcome.DEAD_LETTERED: logging.ERROR,
    Outcome.LEASE_LOST: logging.WARNING,
}


class JobTimeout(Exception):
    """The job ran past its queue's ``job_timeout``."""

    __module__ = "pg_worker"  # its public name, as the dead-letter queue records it


class HandlerReturnedValue(PermanentFailure, TypeError):
    """A handler returned a generator: its body never ran, a programming error that trying again cannot mend,
    so the message goes to the dead-letter queue (to be replayed once the code is fixed)."""


class Interrupted(Exception):
    """Shutdown stopped the job; its message is handed back."""

    def __init__(self, abandoned_thread: bool = False) -> None:
        super().__init__("interrupted by shutdown")
        self.abandoned_thread = abandoned_thread


class _LeaseLost(Exception):
    pass


class _NotStarted(Exception):
    """The lease ended before the job could start: it is dropped without running."""


def _int_header(headers: Any, key: str) -> int | None:
    if headers is None or not isinstance(headers, Mapping):  # None first: most messages have no headers
        return None
    value = headers.get(key)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def public_headers(headers: Any) -> Any:
    """The headers as the producer sent them (pg-worker's keys removed, non-object headers unwrapped)."""
    if headers is not None and isinstance(headers, Mapping) and any(key in headers for key in _sql.INTERNAL_HEADERS):
        if _sql.ORIGINAL_KEY in headers:
            return headers[_sql.ORIGINAL_KEY]
        return {k: v for k, v in headers.items() if k not in _sql.INTERNAL_HEADERS}
    return headers


class Executor:
    def __init__(
        self,
        app: App,
        leases: LeaseKeeper,
        completer: Completer,
        observers: WorkerObserver,
        health: WorkerHealth,
        threads: ThreadPoolExecutor,
    ) -> None:
        self._app = app
        self._leases = leases
        self._completer = completer
        self._observers = observers
        self._health = health
        self._threads = threads
        # One suspect at a time runs in this process; ordinary jobs never wait for it (see the module doc).
        self._suspect_lane = asyncio.Lock()
        self._sync_lock = threading.Lock()
        self.sync_running = 0
        self.shutting_down = False
        self.interrupted: list[Lease] = []
        self.abandoned: list[Lease] = []  # interrupted by shutdown while their sync thread still ran

    async def run(self, lease: Lease, enqueued_at: Any, message: Any, headers: Any) -> None:
        queue = lease.queue.name
        try:
            if lease.read_ct >= _sql.MAX_READ_CT:
                raise BadMessage("read_ct_exhausted", f"read {lease.read_ct} times: its read count cannot grow, so no delivery of it could be fenced")
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
                error = RuntimeError(f"the worker died (or lost the lease) {solo_starts} times while this message was the only suspect running")
                await self._give_up(lease, job, handler, error, "killed_worker", time.perf_counter())
                return
        if not solo:
            if lease.alive():
                await self._execute(lease, job, handler)
            else:
                self._not_started(lease, job)
            return
        try:
            await self._suspect_lane.acquire()
        except asyncio.CancelledError:
            if not self.shutting_down:
                raise
            self.interrupted.append(lease)  # never started: handed back at shutdown
            return
        try:
            # It may have waited in the lane since its read: it starts only while its lease is still ours by
            # the clock (a sync job checks once more as its thread starts), else another worker may run it now.
            if not lease.alive():
                self._not_started(lease, job)
                return
            # What finished before must be on record before a suspect runs: if it kills the process, the
            # jobs that succeeded next to it must not come back as suspects themselves.
            if not (await self._completer.flush(time.monotonic() + 5.0) and await self._mark_solo(lease, job)):
                self._leases.abandon(lease)  # the database failed: the message comes back after its lease
                return
            await self._execute(lease, job, handler)
        finally:
            self._suspect_lane.release()

    @staticmethod
    def _is_suspect(lease: Lease, headers: Any) -> bool:
        """The previous delivery ended without a recorded outcome (retry or hand-back)."""
        return lease.read_ct > 1 and _int_header(headers, _sql.CLOSED_KEY) != lease.read_ct - 1

    async def _mark_solo(self, lease: Lease, job: Job[Any]) -> bool:
        logger.warning(
            "suspect_running",
            extra={"event": "suspect_running", "queue": job.queue, "msg_id": job.msg_id, "attempt": job.attempt, "why": "its previous delivery ended with no outcome (worker died or lease lost)", "note": "one suspect at a time; other jobs go on"},
        )
        return bool(await self._completer.mark_solo(lease))

    # -- the handler ----------------------------------------------------------------------------------------

    async def _execute(self, lease: Lease, job: Job[Any], handler: Handler) -> None:
        task = lease.task or asyncio.current_task()  # set by the worker: current_task() costs a getpid() here
        assert task is not None
        if handler.is_async:
            _cancel_on_loss(lease, task)
            self._report_started(job)
        started = time.perf_counter()
        try:
            try:
                if handler.is_async:
                    await self._run_async(lease, job, handler, task)
                else:
                    await self._run_sync(lease, job, handler, task)
            except asyncio.CancelledError:
                if self.shutting_down:
                    raise Interrupted() from None
                if lease.held:
                    raise
                task.uncancel()
                raise _LeaseLost() from None
            finally:
                lease.on_lost = None  # the handler is done: a lease lost now must not cancel the outcome's write
        except _NotStarted:
            self._not_started(lease, job)
            return
        except Interrupted as exc:
            (self.abandoned if exc.abandoned_thread else self.interrupted).append(lease)
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
        # Counted by acked() once the acknowledgement is confirmed (it may find the lease lost after all).
        lease.done = (job, handler, time.perf_counter() - started)
        self._completer.ack(lease)

    def acked(self, lease: Lease, held: bool | None) -> None:
        """The acknowledgement of a job that succeeded was written (True), matched nothing (False: another
        worker has its message; its loss is logged), or could not be sent before shutdown (None)."""
        if lease.done is None:
            return  # counted already (a confirmation cannot come twice, but a bookkeeping slip must not crash)
        job, handler, duration = lease.done
        lease.done = None
        started = time.perf_counter() - duration  # the handler's own run time, not the wait for the database
        if held:
            self._finish(job, Outcome.SUCCEEDED, started, None, handler)
        elif held is False:
            self._finish(job, Outcome.LEASE_LOST, started, None, handler, why=lease.lost, operation="ack")
        else:
            self._finish(job, Outcome.FAILED, started, None, handler, note="succeeded, but its acknowledgement could not be written: it runs again")

    def _report_started(self, job: Job[Any]) -> None:
        self._observers.job_started(job, max(0.0, time.time() - job.enqueued_at.timestamp()))

    async def _run_async(self, lease: Lease, job: Job[Any], handler: Handler, task: asyncio.Task[Any]) -> None:
        func: Any = handler.func
        await self._on_loop(lease, handler, functools.partial(func, job), lease.queue.job_timeout, task)

    async def _on_loop(self, lease: Lease, handler: Handler, call: Callable[[], Any], seconds: float, task: asyncio.Task[Any]) -> None:
        """Run ``call`` and await what it returns, cancelled after ``seconds`` (a JobTimeout).

        The timeout is kept by the lease clock (one timer for every job, not one per job); a TimeoutError the
        handler raises itself (a slow router) is an ordinary failure, never taken for ours."""
        timed_out = False

        def time_out(_lease: Lease) -> None:
            nonlocal timed_out
            timed_out = True
            task.cancel("job timeout")

        self._leases.set_deadline(lease, seconds, time_out)
        try:
            result = call()
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

    async def _run_sync(self, lease: Lease, job: Job[Any], handler: Handler, task: asyncio.Task[Any]) -> None:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        future = loop.run_in_executor(self._threads, functools.partial(self._call_sync, handler, job, lease, loop, started))

        def stop_waiting(_lease: Lease) -> None:
            # A thread cannot be stopped once it runs the handler; until then the job is only queued.
            if not started.is_set():
                task.cancel("lease lost")

        lease.on_lost = stop_waiting
        # The timeout counts from the moment a thread runs the handler: a job queued behind a pool of stuck
        # threads has not started, so it cannot have timed out.
        await self._thread_start(lease, task, started, future)
        if not started.is_set():
            raise _NotStarted()  # the thread found the lease gone and did not call the handler
        lease.on_lost = None
        self._report_started(job)
        thread_started = time.monotonic()
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
            _discard(result)
            raise JobTimeout(f"job exceeded job_timeout of {lease.queue.job_timeout:g}s (the thread returned later)")
        if inspect.isawaitable(result):
            # A plain callable that returned an awaitable (a lambda around an async function): its work starts
            # only now, on the loop, and gets what an async handler gets: the rest of the job's timeout, and
            # cancellation when the lease is lost.
            if not lease.held:
                _discard(result)
                raise _LeaseLost()
            _cancel_on_loss(lease, task)
            remaining = lease.queue.job_timeout - (time.monotonic() - thread_started)
            await self._on_loop(lease, handler, lambda: result, max(remaining, 0.0), task)
            return
        _check_result(handler, result)

    async def _thread_start(self, lease: Lease, task: asyncio.Task[Any], started: asyncio.Event, future: asyncio.Future[Any]) -> None:
        """Wait until a thread takes the job (or finds its lease gone, or returns)."""
        waiter = asyncio.ensure_future(started.wait())
        while True:
            try:
                await asyncio.wait([waiter, future], return_when=asyncio.FIRST_COMPLETED)
                break
            except asyncio.CancelledError:
                if not started.is_set() and future.cancel():
                    waiter.cancel()
                    if not lease.held and not self.shutting_down:
                        task.uncancel()
                        raise _NotStarted() from None
                    raise
                if self.shutting_down or lease.held:
                    waiter.cancel()
                    raise Interrupted(abandoned_thread=not future.done()) from None
                # The lease was lost just as a thread took the job: it cannot be stopped now. It runs like any
                # sync job whose lease is lost: to its end, its result thrown away.
                task.uncancel()
        waiter.cancel()

    def _call_sync(self, handler: Handler, job: Job[Any], lease: Lease, loop: asyncio.AbstractEventLoop, started: asyncio.Event) -> Any:
        # Checked here, in the thread, at the moment it would start: the queue in front of the pool may have
        # held the job past its lease while the loop still believed it held (its timer not run yet).
        if not lease.alive():
            return None
        with self._sync_lock:
            self.sync_running += 1
        loop.call_soon_threadsafe(started.set)
        try:
            return handler.func(job)
        finally:
            with self._sync_lock:
                self.sync_running -= 1

    # -- outcomes -------------------------------------------------------------------------------------------

    def _not_started(self, lease: Lease, job: Job[Any]) -> None:
        """Dropped without running: the lease ended while the job waited (another worker may run it now)."""
        self._leases.lose(lease, "expired", "lease_clock")  # no-op when its timer (or a renewal) found it first
        self._observers.lease_lost(job.queue, job.msg_id, "start")
        logger.warning(
            "job_not_started",
            extra={
                "event": "job_not_started",
                "queue": job.queue,
                "msg_id": job.msg_id,
                "attempt": job.attempt,
                "why": lease.lost,
                "note": "its lease ended while it waited to start; it was dropped unrun and runs again after its lease",
            },
        )

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
        deferred = isinstance(exc, RetryLater) and not exc.count_attempt
        written = await self._completer.retry(lease, delay, count_attempt=not deferred)
        if written is False:
            self._finish(job, Outcome.LEASE_LOST, started, exc, handler, why=lease.lost, operation="retry")
            return
        if written is None:  # the database failed: the message comes back after its lease instead
            self._finish(job, Outcome.FAILED, started, exc, handler, retry_in_s=round(delay, 3))
            return
        self._finish(job, Outcome.DEFERRED if deferred else Outcome.RETRIED, started, exc, handler, retry_in_s=round(delay, 3))

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


def _discard(result: Any) -> None:
    """Close a coroutine that will never run (no "never awaited" warning; its ``finally`` blocks run)."""
    if inspect.iscoroutine(result):
        result.close()


# Handlers already warned about returning a value: once per handler, not once per job.
_RETURNED_VALUE_WARNED: weakref.WeakSet[Handler] = weakref.WeakSet()


def _check_result(handler: Handler, result: Any) -> None:
    """A returned value is ignored: the handler returned, so its work is done (App.add_handler refuses handlers
    that declare a return value). Only a generator is an error: none of its body ran."""
    if result is None:
        return
    if inspect.isgenerator(result) or inspect.isasyncgen(result):
        raise HandlerReturnedValue(f"handler {handler.name} returned a {type(result).__name__}: none of its body ran")
    if handler not in _RETURNED_VALUE_WARNED:
        _RETURNED_VALUE_WARNED.add(handler)
        logger.warning(
            "handler_returned_value",
            extra={"event": "handler_returned_value", "queue": handler.queue, "handler": handler.name, "type": type(result).__name__, "note": "ignored, the job counts as succeeded; a handler fails by raising (logged once per handler)"},
        )


def _cancel_on_loss(lease: Lease, task: asyncio.Task[Any]) -> None:
    """From now on, losing the lease cancels the job's task (a handler running on the loop can be stopped)."""

    def stop_job(_lease: Lease) -> None:
        task.cancel("lease lost")

    lease.on_lost = stop_job
