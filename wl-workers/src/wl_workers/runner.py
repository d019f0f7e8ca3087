"""``wl-workers run``: a pg-worker Worker serving wl-workers' App, run as ``pg-worker run`` runs one (its
/metrics with our per-device metrics added, /healthz, /readyz, signal handling), the optional periodic
reconcile, and the optional device-network self-check (netcheck.py): in /readyz, and a graceful stop then a
non-zero exit when it stays failed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random

import psycopg

from pg_worker import App, SetupError, Worker, WorkerCrashed
from pg_worker import cli as pg_worker_cli
from pg_worker.settings import WorkerSettings

from ._migrate import pending_migrations
from .app import build_app
from .metrics import COLLECTORS
from .netcheck import NetworkMonitor
from .reconcile import count_diverged, reconcile_once_exclusive
from .settings import WlSettings

logger = logging.getLogger(__name__)

# Each device action holds a database connection while it talks to the router: a smaller default than
# pg-worker's 100 keeps a worker's connections in proportion (override with PG_WORKER_CONCURRENCY).
DEFAULT_CONCURRENCY = 16


def worker_settings() -> WorkerSettings:
    if "PG_WORKER_CONCURRENCY" in os.environ:
        return WorkerSettings()
    return WorkerSettings(concurrency=DEFAULT_CONCURRENCY)


async def _periodic_reconcile(conninfo: str, settings: WlSettings, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            # +-10 % jitter: the workers of a fleet do not all read every router in the same second
            await asyncio.wait_for(stop.wait(), timeout=settings.reconcile_interval * (0.9 + 0.2 * random.random()))
        if stop.is_set():
            return
        try:
            report = await reconcile_once_exclusive(conninfo, settings)
        except Exception as exc:  # a failed pass is retried at the next interval; the worker goes on
            logger.exception("reconcile_failed", extra={"event": "reconcile_failed", "error": str(exc)})
            continue
        if report is not None:
            logger.info(
                "reconcile_finished",
                extra={
                    "event": "reconcile_finished", "checked": report.checked, "differences": len(report.differences),
                    "enqueued": len(report.enqueued), "errors": len(report.errors), "failed_devices": sorted(report.failed_devices),
                },
            )


async def _count_diverged_periodically(conninfo: str, settings: WlSettings) -> None:
    while True:
        try:
            await count_diverged(conninfo, settings)
        except (psycopg.Error, OSError) as exc:  # the database is away: the gauge keeps its last value, pg-worker alerts
            logger.warning("diverged_count_failed", extra={"event": "diverged_count_failed", "error": str(exc)})
        await asyncio.sleep(settings.diverged_interval)


STARTUP_RETRY_FIRST, STARTUP_RETRY_MAX = 0.5, 10.0


async def _pending_when_reachable(conninfo: str) -> list[str]:
    """The pending migrations, once the database answers: at start-up a database that is not up yet (compose
    starting both, a restart) is waited for with backoff, as pg-worker's own start-up does; a SIGTERM/SIGINT ends
    the wait. A database that refuses us for good (no such database, bad password) is not retried."""
    from pg_worker._worker import _is_permanent

    delay, attempt = STARTUP_RETRY_FIRST, 0
    while True:
        try:
            return await pending_migrations(conninfo)
        except psycopg.OperationalError as exc:
            if _is_permanent(exc):
                raise SetupError(f"cannot use the database: {str(exc).strip().splitlines()[0]}") from None
            attempt += 1
            logger.warning(
                "db_error",
                extra={"event": "db_error", "operation": "startup", "attempt": attempt, "retry_in_s": round(delay, 3), "error": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__},
            )
            await asyncio.sleep(delay * (0.75 + random.random() / 2))
            delay = min(delay * 2, STARTUP_RETRY_MAX)


async def serve(conninfo: str, settings: WlSettings, wsettings: WorkerSettings) -> Worker:
    pending = await _pending_when_reachable(conninfo)
    if pending:
        # handlers would fail on every job (and dead-letter them): refuse to start instead
        raise SetupError(f"schema wl lacks migrations {', '.join(pending)}: run `wl-workers migrate` first")
    if settings.mercadopago_access_token is None:
        # the queue is consumed all the same: each payment job would fail, retry, and end in the dead-letter queue
        logger.warning(
            "payment_sync_without_token",
            extra={"event": "payment_sync_without_token", "queue": "payment_sync", "error": "MERCADOPAGO_ACCESS_TOKEN is not set: payments.sync jobs will fail"},
        )
    app = build_app(conninfo, settings)
    netcheck = settings.netcheck()
    monitor = NetworkMonitor(netcheck) if netcheck is not None else None
    if monitor is not None:
        app.readiness_check("device_network")(monitor.readiness)
    for collector in COLLECTORS:
        app.add_collector(collector)
    if settings.reconcile_interval > 0:

        @app.background_task("reconcile")
        async def _reconcile(_: App) -> None:  # supervised by the worker, cancelled when it stops
            await _periodic_reconcile(conninfo, settings, asyncio.Event())

    @app.background_task("diverged")
    async def _diverged(_: App) -> None:
        await _count_diverged_periodically(conninfo, settings)

    worker = Worker(app, conninfo, wsettings.worker_config(), listen_conninfo=wsettings.listen_url)
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_device_network(monitor, worker, stop)) if monitor is not None else None
    outcome: Exception | None = None
    try:
        await pg_worker_cli.serve(worker, wsettings)  # /metrics (ours included), /healthz, /readyz; signals
    finally:
        stop.set()
        if watcher is not None:
            outcome = await watcher
    if outcome is not None:
        # the worker has stopped gracefully (jobs finished or handed back); now exit non-zero, to be restarted
        raise outcome
    return worker


async def _watch_device_network(monitor: NetworkMonitor, worker: Worker, stop: asyncio.Event) -> Exception | None:
    """Stops the worker when the device network is lost, or when the check itself breaks (a worker must not go
    on without the check it was configured with); returns what ``serve`` raises afterwards."""
    try:
        lost = await monitor.run(stop)
    except Exception as exc:
        logger.exception("device_network_check_crashed", extra={"event": "device_network_check_crashed", "error": str(exc)})
        worker.request_stop()
        return WorkerCrashed(f"the device-network check crashed: {type(exc).__name__}: {exc}")
    if lost is not None:
        worker.request_stop()
    return lost
