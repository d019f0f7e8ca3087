"""Prometheus metrics: an observer of the worker's lifecycle events plus cached per-queue statistics.

This module imports the core; the core never imports it. Everything is registered on a registry of its own
(default: a fresh one per :class:`WorkerMetrics`), so several workers in one process (tests) do not collide.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ._events import Outcome, WakeupSource, WorkerObserver
from .admin import QueueStats, fetch_queue_stats

if TYPE_CHECKING:
    from ._app import Job
    from ._worker import Worker

logger = logging.getLogger(__name__)

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


# Label values known before anything happens. Counters start at 0 for each, so that rate()/increase() alerts see
# the first error as an increase (a series that appears at 1 has no earlier sample to compare with).
DB_OPERATIONS = (
    "startup", "read", "check", "poll", "ack", "retry", "dead_letter", "hand_back", "renew_lease", "mark_solo", "unmark", "listen", "queue_stats",
)
# What finds a lease lost: a fenced write that matched nothing, or the lease's own clock. ``start``: a job read
# but still waiting to start (for a thread, behind a suspect) whose lease had ended: dropped without running.
LEASE_OPERATIONS = ("ack", "retry", "dead_letter", "hand_back", "renew_lease", "mark_solo", "lease_clock", "start")
REJECT_REASONS = ("not_an_object", "invalid_type", "unknown_type", "invalid_payload", "read_ct_exhausted")
WORKER_ERROR_TYPES = ("JobTimeout", "PermanentFailure")


class _Buckets:
    """A histogram's counts as plain numbers (observed on the event loop, read at scrape time)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket i holds bounds[i-1] < value <= bounds[i]
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(('+Inf' if bound == float('inf') else repr(float(bound)), float(total)))
        return out


class _QueueJobs:
    """Per-queue job figures, updated for every job: no label lookup, no lock, no metric object per update."""

    __slots__ = ("duration", "in_flight", "latency", "outcomes")

    def __init__(self) -> None:
        self.in_flight = 0
        self.outcomes: dict[str, int] = {}
        self.latency = _Buckets(LATENCY_BUCKETS)
        self.duration = _Buckets(DURATION_BUCKETS)


class _JobsCollector(Collector):
    """``pg_worker_jobs_total``, the duration and latency histograms and ``pg_worker_jobs_in_flight``, from the
    plain per-queue figures. prometheus-client's own objects cost a labels() lookup and a lock per update, and
    four of them ran for every job (15% of the drain profile). The scrape thread reads ints the event loop
    writes: a scrape may miss the job being counted at that instant, never a whole one."""

    def __init__(self, queues: dict[str, _QueueJobs]) -> None:
        self._queues = queues

    def collect(self) -> Iterator[Metric]:
        jobs = CounterMetricFamily("pg_worker_jobs", "Jobs that left a handler (or were rejected), by outcome.", labels=["queue", "outcome"])
        duration = HistogramMetricFamily("pg_worker_job_duration_seconds", "Handler run time.", labels=["queue"])
        latency = HistogramMetricFamily(
            "pg_worker_job_latency_seconds", "From enqueue to handler start (includes delays and retries).", labels=["queue"]
        )
        in_flight = GaugeMetricFamily("pg_worker_jobs_in_flight", "Jobs running now.", labels=["queue"])
        for queue, stats in list(self._queues.items()):
            for outcome, count in list(stats.outcomes.items()):
                jobs.add_metric([queue, outcome], count)
            duration.add_metric([queue], stats.duration.cumulative(), stats.duration.sum)
            latency.add_metric([queue], stats.latency.cumulative(), stats.latency.sum)
            in_flight.add_metric([queue], stats.in_flight)
        yield from (jobs, duration, latency, in_flight)


class WorkerMetrics(WorkerObserver):
    """Counts what a worker does. Pass it to ``Worker(observers=[...])``.

    ``pg_worker_jobs_total{outcome}``: ``succeeded``; ``retried`` (failed, will run again); ``deferred`` (the
    handler raised ``RetryLater(count_attempt=False)``: runs again later, no attempt used); ``dead_lettered``
    (failed for good, or rejected as malformed); ``interrupted`` (handed back at shutdown); ``failed`` (failed,
    and recording the retry or dead-letter move failed too: the message returns after its visibility timeout);
    ``lease_lost`` (the lease ran out or another worker took the message: the job was stopped, nothing written).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._jobs: dict[str, _QueueJobs] = {}
        r.register(_JobsCollector(self._jobs))
        self.failures = Counter("pg_worker_job_failures", "Handler failures by exception type.", ["queue", "error_type"], registry=r)
        self.rejected = Counter("pg_worker_messages_rejected", "Messages dead-lettered without reaching a handler.", ["queue", "reason"], registry=r)
        self.wakeups = Counter("pg_worker_wakeups", "Fetch loop wakeups by source.", ["queue", "source"], registry=r)
        self.notifications = Counter("pg_worker_notifications", "NOTIFY messages received.", ["queue"], registry=r)
        self.listen_connected = Gauge("pg_worker_listen_connected", "1 while the LISTEN connection is up.", registry=r)
        self.listen_reconnects = Counter("pg_worker_listen_disconnects", "Times the LISTEN connection was lost.", registry=r)
        self.db_errors = Counter("pg_worker_db_errors", "Failed database operations, by operation.", ["operation"], registry=r)
        self.leases_lost = Counter(
            "pg_worker_leases_lost", "Held deliveries found not to be ours any more, by what found it.", ["queue", "operation"], registry=r
        )
        self.loop_blocked = Counter(
            "pg_worker_event_loop_blocked", "Times the event loop was blocked past the bound (a handler doing blocking work on it).", registry=r
        )
        self.last_notification = Gauge(
            "pg_worker_last_notification_age_seconds", "Seconds since the last NOTIFY arrived (-1: none yet).", registry=r
        )
        self._last_notification_at: float | None = None
        self.last_notification.set_function(self._notification_age)
        self._children: dict[tuple[Any, ...], Any] = {}

    def start_at_zero(self, queues: Iterable[str]) -> None:
        """Create every known labelled series at 0 (``instrument`` does this for the worker's queues)."""
        for operation in DB_OPERATIONS:
            self._child(self.db_errors, operation)
        for queue in queues:
            stats = self._queue(queue)
            for outcome in Outcome:
                stats.outcomes.setdefault(outcome.value, 0)
            for reason in REJECT_REASONS:
                self._child(self.rejected, queue, reason)
            for error_type in WORKER_ERROR_TYPES:
                self._child(self.failures, queue, error_type)
            for operation in LEASE_OPERATIONS:
                self._child(self.leases_lost, queue, operation)

    def _notification_age(self) -> float:
        at = self._last_notification_at
        return -1.0 if at is None else time.monotonic() - at

    def _child(self, metric: Any, *labels: str) -> Any:
        # labels() looks the child up under a lock each time; jobs are hot, so keep the children.
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _queue(self, queue: str) -> _QueueJobs:
        stats = self._jobs.get(queue)
        if stats is None:
            stats = self._jobs[queue] = _QueueJobs()
        return stats

    def job_started(self, job: Job[object], latency: float) -> None:
        stats = self._jobs.get(job.queue) or self._queue(job.queue)
        stats.latency.observe(latency)
        stats.in_flight += 1

    def job_finished(self, job: Job[object], outcome: Outcome, duration: float, error: BaseException | None) -> None:
        stats = self._jobs.get(job.queue) or self._queue(job.queue)
        stats.in_flight -= 1
        stats.duration.observe(duration)
        outcomes = stats.outcomes
        outcomes[outcome.value] = outcomes.get(outcome.value, 0) + 1
        if error is not None and outcome not in (Outcome.INTERRUPTED, Outcome.DEFERRED):
            self._child(self.failures, job.queue, type(error).__name__).inc()

    def message_rejected(self, queue: str, msg_id: int, reason: str) -> None:
        self._child(self.rejected, queue, reason).inc()
        outcomes = self._queue(queue).outcomes
        outcomes[Outcome.DEAD_LETTERED.value] = outcomes.get(Outcome.DEAD_LETTERED.value, 0) + 1

    def wakeup(self, queue: str, source: WakeupSource) -> None:
        self._child(self.wakeups, queue, source.value).inc()

    def listen_state(self, connected: bool) -> None:
        self.listen_connected.set(1 if connected else 0)
        if not connected:
            self.listen_reconnects.inc()

    def notification(self, queue: str) -> None:
        self._last_notification_at = time.monotonic()
        self._child(self.notifications, queue).inc()

    def db_error(self, operation: str, error: BaseException) -> None:
        self._child(self.db_errors, operation).inc()

    def lease_lost(self, queue: str, msg_id: int, operation: str) -> None:
        self._child(self.leases_lost, queue, operation).inc()

    def event_loop_blocked(self, seconds: float) -> None:
        self.loop_blocked.inc()


class QueueStatsCollector(Collector):
    """Per-queue gauges, refreshed at most every ``max_age`` seconds and only when scraped.

    An unscraped worker costs the database nothing; a scraped one one statement per ``max_age``.
    """

    def __init__(self, conninfo: str, queues: Iterable[str], *, max_age: float = 60.0, on_error: Callable[[BaseException], None] | None = None) -> None:
        self._conninfo = conninfo
        self._queues = list(queues)
        self._max_age = max_age
        self._on_error = on_error
        self._lock = threading.Lock()
        self._cached: list[QueueStats] = []
        self._fetched_at: float | None = None

    def _refresh(self) -> list[QueueStats]:
        with self._lock:
            now = time.monotonic()
            if self._fetched_at is None or now - self._fetched_at >= self._max_age:
                try:
                    with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                        self._cached = fetch_queue_stats(conn, self._queues)
                    self._fetched_at = now
                except psycopg.Error as exc:
                    logger.warning("queue_stats_failed", extra={"event": "queue_stats_failed", "error": str(exc).strip()})
                    if self._on_error is not None:
                        self._on_error(exc)
                    self._fetched_at = now  # keep serving the last figures; try again after max_age
            return self._cached

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._refresh()
        families = {
            "depth": GaugeMetricFamily("pg_worker_queue_depth", "Messages in the queue (estimated past the exact-count limit).", labels=["queue"]),
            "visible": GaugeMetricFamily("pg_worker_queue_visible_depth", "Messages ready to be read now.", labels=["queue"]),
            "in_flight": GaugeMetricFamily("pg_worker_queue_in_flight", "Messages leased by some worker (read, not yet finished).", labels=["queue"]),
            "delayed": GaugeMetricFamily("pg_worker_queue_delayed", "Messages sent with a delay, not yet visible.", labels=["queue"]),
            "oldest": GaugeMetricFamily("pg_worker_queue_oldest_message_age_seconds", "Age of the oldest message (0 when empty).", labels=["queue"]),
            "dlq": GaugeMetricFamily("pg_worker_dlq_depth", "Messages in the queue's dead-letter queue.", labels=["queue"]),
            "estimated": GaugeMetricFamily("pg_worker_queue_depth_estimated", "1 when the depth figures are estimates.", labels=["queue"]),
        }
        for s in stats:
            families["depth"].add_metric([s.queue], s.depth)
            families["visible"].add_metric([s.queue], s.visible)
            families["in_flight"].add_metric([s.queue], s.in_flight)
            families["delayed"].add_metric([s.queue], s.delayed)
            families["oldest"].add_metric([s.queue], s.oldest_age or 0.0)
            families["dlq"].add_metric([s.queue], s.dlq_depth)
            families["estimated"].add_metric([s.queue], 1 if s.estimated else 0)
        yield from families.values()


def instrument(worker: Worker, *, registry: CollectorRegistry | None = None, stats_max_age: float = 60.0) -> WorkerMetrics:
    """Attach metrics to a worker (before it runs): its events, the cached queue statistics, and the
    collectors its app added (:meth:`App.add_collector`)."""
    metrics = WorkerMetrics(registry)
    metrics.start_at_zero(worker.app.queues)
    worker.observers.add(metrics)
    metrics.registry.register(
        QueueStatsCollector(worker.conninfo, worker.app.queues, max_age=stats_max_age, on_error=lambda exc: metrics.db_error("queue_stats", exc))
    )
    for collector in worker.app.collectors:  # App.add_collector: the service's own metrics, on the same port
        metrics.registry.register(collector)
    return metrics
