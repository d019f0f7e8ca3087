"""Prometheus metrics of one app instance (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ._events import STANDARD_TYPES

_KNOWN_TYPES = frozenset(STANDARD_TYPES) | {"payment", "payment.created", "payment.updated"}


def type_label(event_type: str) -> str:
    # Event types come from the request: unknown ones share one label so a sender cannot grow the series.
    return event_type if event_type in _KNOWN_TYPES else "other"


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "webhook_events_total",
            "Verified events by outcome: accepted (stored, job enqueued), stored (no job for its type), "
            "ignored (unknown type, stored), unknown_service (stored, no job: the service does not exist; alert on it), "
            "duplicate (already stored, nothing enqueued).",
            ["provider", "type", "outcome"],
            registry=self.registry,
        )
        # Present from the start (at 0), so that an alert on increase() sees the very first unknown service.
        for event_type, job in STANDARD_TYPES.items():
            if job is not None:
                self.events.labels("standard", event_type, "unknown_service")
        self.rejections = Counter(
            "webhook_rejections_total",
            "Requests turned away, by reason (missing_signature, bad_signature, bad_timestamp, "
            "timestamp_out_of_window, body_too_large, bad_content_length, body_timeout, client_disconnected, "
            "malformed_json, non_finite_number, number_out_of_range, number_too_long, invalid_string, too_deep, schema, "
            "event_time_out_of_window, invalid_amount, invalid_currency, provider_disabled, database_unavailable, "
            "database_timeout, database_error, internal_error).",
            ["provider", "reason"],
            registry=self.registry,
        )
        self.jobs = Counter("webhook_jobs_enqueued_total", "Jobs enqueued, by queue and job type.", ["queue", "type"], registry=self.registry)
        self.duration = Histogram(
            "webhook_request_duration_seconds",
            "Time to answer a webhook request, by provider and status code.",
            ["provider", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )

        self.pruned = Counter("webhook_events_pruned_total", "Events deleted by the retention job.", registry=self.registry)
        self.prune_failures = Counter("webhook_prune_failures_total", "Retention runs that failed (retried next round).", registry=self.registry)
        self.reconnect_failures = Counter(
            "webhook_db_reconnect_failures_total",
            "Database reconnection attempts given up (the next request or readiness probe starts a new one).",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
