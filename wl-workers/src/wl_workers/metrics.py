"""wl-workers' Prometheus metrics, per device. They live on a registry of their own (``REGISTRY``), which the
runner attaches to pg-worker's ``/metrics`` registry, so one scrape shows both."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

ACTIONS = Counter(
    "wl_device_actions",
    "Device actions by outcome: applied, stale (older than the newest accepted event), transient, permanent, busy, parked.",
    ["device", "action", "outcome"],
    registry=REGISTRY,
)
FAILURES = Counter("wl_device_failures", "Failed device actions by class (transient, permanent).", ["device", "error_class"], registry=REGISTRY)
LATENCY = Histogram(
    "wl_device_action_duration_seconds",
    "Time a device took for one look-up/change/verify action.",
    ["device"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
RECONCILE = Counter("wl_reconcile_services", "Services seen by reconcile, by result (in_sync, differs, error).", ["device", "result"], registry=REGISTRY)
PAYMENT_SYNCS = Counter(
    "wl_payment_syncs",
    "payments.sync jobs by outcome (activated, not_approved, unknown_service, transient, permanent).",
    ["provider", "outcome"],
    registry=REGISTRY,
)

NETCHECKS = Counter(
    "wl_device_network_checks",
    "Periodic device-network self-checks by result: ok, interface (missing or down), route (a target not routed through the interface), targets (no device address answered).",
    ["result"],
    registry=REGISTRY,
)

LOCKS_LOST = Counter(
    "wl_lock_lost",
    "Jobs that found their service lock or device slot gone (connection lost) around a router write; each is retried and re-converged.",
    ["device"],
    registry=REGISTRY,
)
RECONCILE_DEVICES = Counter(
    "wl_reconcile_devices", "Devices per reconcile pass, by result (ok, failed, timeout).", ["device", "result"], registry=REGISTRY
)

ROUTE_GUARD_REFUSALS = Counter(
    "wl_route_guard_refusals",
    "Router calls refused because the kernel would not route the device address through the tunnel interface "
    "(WL_REQUIRE_ROUTE_VIA), by reason: no_route, other_interface.",
    ["device", "reason"],
    registry=REGISTRY,
)

DIVERGED = Gauge(
    "wl_services_diverged",
    "Services whose router was last seen in another state than desired, or whose newest desired state is not applied "
    "after WL_DIVERGED_GRACE seconds; counted from the database every WL_DIVERGED_INTERVAL seconds by every worker.",
    ["device"],
    registry=REGISTRY,
)

COLLECTORS = (ACTIONS, FAILURES, LATENCY, RECONCILE, PAYMENT_SYNCS, NETCHECKS, LOCKS_LOST, RECONCILE_DEVICES, ROUTE_GUARD_REFUSALS, DIVERGED)
