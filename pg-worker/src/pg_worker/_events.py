"""Lifecycle events a worker reports to its observers (metrics, tests, services).

The worker core only calls these methods; observers (e.g. the Prometheus exporter) import the core, never
the reverse. Observer methods run inline on the event loop: they must be quick and must not raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._app import Job

logger = logging.getLogger(__name__)


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    RETRIED = "retried"
    DEFERRED = "deferred"  # RetryLater(count_attempt=False): runs again later, no attempt used
    DEAD_LETTERED = "dead_lettered"
    INTERRUPTED = "interrupted"  # handed back at shutdown
    FAILED = "failed"  # failed, and recording the retry or dead-letter move failed too (database down)
    LEASE_LOST = "lease_lost"  # the lease ran out or another worker took the message: nothing was written


class WakeupSource(StrEnum):
    STARTUP = "startup"
    NOTIFY = "notify"
    POLL = "poll"
    TIMER = "timer"  # a delayed or retried message became visible
    RECHECK = "recheck"  # a producer raced with the worker going to sleep
    RECONNECT = "reconnect"


class WorkerObserver:
    """Base class with no-op methods: override what you need."""

    def job_started(self, job: Job[object], latency: float) -> None:
        """``latency``: seconds from enqueue (or from becoming visible) to handler start."""

    def job_finished(self, job: Job[object], outcome: Outcome, duration: float, error: BaseException | None) -> None:
        """A job left the handler. ``duration`` is the handler's run time in seconds."""

    def message_rejected(self, queue: str, msg_id: int, reason: str) -> None:
        """A message went to the dead-letter queue without reaching a handler (malformed, unknown type)."""

    def wakeup(self, queue: str, source: WakeupSource) -> None:
        """The fetch loop of ``queue`` woke up and will read."""

    def listen_state(self, connected: bool) -> None:
        """The LISTEN connection came up or went down."""

    def notification(self, queue: str) -> None:
        """A NOTIFY arrived for ``queue``."""

    def db_error(self, operation: str, error: BaseException) -> None:
        """A database operation failed (it is retried or its message comes back later)."""

    def loop_tick(self) -> None:
        """The worker's main loop is alive (called at least once per poll cycle and after each batch)."""

    def lease_lost(self, queue: str, msg_id: int, operation: str) -> None:
        """A held delivery was found not to be ours any more (``operation``: what found it)."""

    def event_loop_blocked(self, seconds: float) -> None:
        """The event loop ran nothing else for ``seconds`` (a handler blocked it): leases may have run out."""


class ObserverGroup(WorkerObserver):
    """Fans every event out to several observers; an observer that raises is logged, never fatal.

    Each event calls only the observers that override it (the base methods do nothing): ``job_started`` and
    ``job_finished`` run for every job, so the dispatch is a cached tuple of bound methods, not a lookup."""

    def __init__(self, observers: list[WorkerObserver] | None = None) -> None:
        self._observers = list(observers or [])
        self._calls: dict[str, tuple[Callable[..., None], ...]] = {}

    def add(self, observer: WorkerObserver) -> None:
        self._observers.append(observer)
        self._calls.clear()

    def _methods(self, method: str) -> tuple[Callable[..., None], ...]:
        calls = self._calls.get(method)
        if calls is None:
            base = getattr(WorkerObserver, method)
            bound = [getattr(observer, method) for observer in self._observers]
            calls = self._calls[method] = tuple(call for call in bound if getattr(call, "__func__", None) is not base)
        return calls

    def _each(self, method: str, *args: object) -> None:
        for call in self._calls.get(method) or self._methods(method):
            try:
                call(*args)
            except Exception:
                logger.exception("observer_failed", extra={"event": "observer_failed", "observer": repr(getattr(call, "__self__", call))})

    def job_started(self, job: Job[object], latency: float) -> None:
        self._each("job_started", job, latency)

    def job_finished(self, job: Job[object], outcome: Outcome, duration: float, error: BaseException | None) -> None:
        self._each("job_finished", job, outcome, duration, error)

    def message_rejected(self, queue: str, msg_id: int, reason: str) -> None:
        self._each("message_rejected", queue, msg_id, reason)

    def wakeup(self, queue: str, source: WakeupSource) -> None:
        self._each("wakeup", queue, source)

    def listen_state(self, connected: bool) -> None:
        self._each("listen_state", connected)

    def notification(self, queue: str) -> None:
        self._each("notification", queue)

    def db_error(self, operation: str, error: BaseException) -> None:
        self._each("db_error", operation, error)

    def loop_tick(self) -> None:
        self._each("loop_tick")

    def lease_lost(self, queue: str, msg_id: int, operation: str) -> None:
        self._each("lease_lost", queue, msg_id, operation)

    def event_loop_blocked(self, seconds: float) -> None:
        self._each("event_loop_blocked", seconds)
