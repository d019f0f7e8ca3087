"""The console's Prometheus metrics (served on ``/metrics``): every refusal and every write is counted."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class ConsoleMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.logins = Counter("wl_console_logins_total", "Login attempts by outcome", ["outcome"], registry=self.registry)
        self.refusals = Counter("wl_console_refusals_total", "Requests refused, by reason", ["reason"], registry=self.registry)
        self.actions = Counter("wl_console_actions_total", "Writes made through the console", ["action", "outcome"], registry=self.registry)
        self.errors = Counter("wl_console_errors_total", "Requests that failed on our side, by error class", ["error"], registry=self.registry)
        self.duration = Histogram(
            "wl_console_request_seconds", "Server time per request by route", ["route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        # touched at start-up: every series exists (at 0) before its first event, so rate() and alerts see it
        for outcome in ("ok", "failed", "throttled"):
            self.logins.labels(outcome)
        for reason in ("csrf", "cross_site", "forbidden", "not_signed_in", "bad_input", "too_large"):
            self.refusals.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
