"""The per-job figures are plain numbers collected at scrape time: what /metrics shows must be exactly what
prometheus-client's own Counter, Histogram and Gauge would show for the same jobs."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pg_worker._events import Outcome
from pg_worker.metrics import DURATION_BUCKETS, LATENCY_BUCKETS, WorkerMetrics


def _samples(registry: CollectorRegistry, names: set[str]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in names
    }


def test_job_figures_match_prometheus_clients_own_metrics() -> None:
    ours = WorkerMetrics()
    ours.start_at_zero(["a", "b"])
    ref = CollectorRegistry()
    jobs = Counter("pg_worker_jobs", "", ["queue", "outcome"], registry=ref)
    duration = Histogram("pg_worker_job_duration_seconds", "", ["queue"], buckets=DURATION_BUCKETS, registry=ref)
    latency = Histogram("pg_worker_job_latency_seconds", "", ["queue"], buckets=LATENCY_BUCKETS, registry=ref)
    in_flight = Gauge("pg_worker_jobs_in_flight", "", ["queue"], registry=ref)
    for queue in ("a", "b"):
        for outcome in Outcome:
            jobs.labels(queue, outcome.value)
        duration.labels(queue)
        latency.labels(queue)
        in_flight.labels(queue)
    # Values on bucket bounds, between them, below the first and above the last.
    values = [0.0, 0.001, 0.0015, 0.25, 1.0, 7.0, 600.0, 601.0, 5000.0]
    for index, value in enumerate(values):
        queue = "a" if index % 3 else "b"
        outcome = list(Outcome)[index % len(Outcome)]
        job = SimpleNamespace(queue=queue)
        ours.job_started(job, value)  # type: ignore[arg-type]
        latency.labels(queue).observe(value)
        if index == 4:
            in_flight.labels(queue).inc()
            continue  # still running
        ours.job_finished(job, outcome, value, None)  # type: ignore[arg-type]
        duration.labels(queue).observe(value)
        jobs.labels(queue, outcome.value).inc()
    ours.message_rejected("b", 1, "unknown_type")
    jobs.labels("b", "dead_lettered").inc()
    names = {
        "pg_worker_jobs_total",
        *(f"pg_worker_job_{m}_seconds_{part}" for m in ("duration", "latency") for part in ("bucket", "count", "sum")),
        "pg_worker_jobs_in_flight",
    }
    expected = _samples(ref, names)
    assert _samples(ours.registry, names) == expected
    assert expected[("pg_worker_jobs_in_flight", frozenset({("queue", "a")}))] == 1
