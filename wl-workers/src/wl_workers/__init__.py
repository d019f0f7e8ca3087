"""wl-workers: switch customers' service on and off on RouterOS routers, idempotently, in order, verified."""

__version__ = "0.1.0"
