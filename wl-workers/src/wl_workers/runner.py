"""``wl-workers run``: a pg-worker Worker serving wl-workers' App, run as ``pg-worker run`` runs one (its
/metrics with our per-device metrics added, /healthz, /readyz, signal handling), the optional periodic
reconcile, and the optional device-network self-check (netcheck.py): in /readyz, and a graceful stop then a
non-zero exit when it stays failed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from pg_worker import SetupError, Worker, WorkerCrashed
from pg_worker import cli as pg_worker_cli
from pg_worker.settings import WorkerSettings

from ._migrate import pending_migrations
from .app import build_app
from .metrics import COLLECTORS
from .netcheck import NetworkMonitor
from .reconcile import reconcile_once_exclusive
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
            await asyncio.wait_for(stop.wait(), timeout=settings.reconcile_interval)
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
                extra={"event": "reconcile_finished", "checked": report.checked, "differences": len(report.differences), "errors": len(report.errors)},
            )


async def serve(conninfo: str, settings: WlSettings, wsettings: WorkerSettings) -> Worker:
    pending = await pending_migrations(conninfo)
    if pending:
        # handlers would fail on every job (and dead-letter them): refuse to start instead
        raise SetupError(f"schema wl lacks migrations {', '.join(pending)}: run `wl-workers migrate` first")
    app = build_app(conninfo, settings)
    netcheck = settings.netcheck()
    monitor = NetworkMonitor(netcheck) if netcheck is not None else None
    if monitor is not None:
        app.readiness_check("device_network")(monitor.readiness)
    for collector in COLLECTORS:
        app.add_collector(collector)
    worker = Worker(app, conninfo, wsettings.worker_config(), listen_conninfo=wsettings.listen_url)
    stop = asyncio.Event()
    reconciler = asyncio.create_task(_periodic_reconcile(conninfo, settings, stop)) if settings.reconcile_interval > 0 else None
    watcher = asyncio.create_task(_watch_device_network(monitor, worker, stop)) if monitor is not None else None
    outcome: Exception | None = None
    try:
        await pg_worker_cli.serve(worker, wsettings)  # /metrics (ours included), /healthz, /readyz; signals
    finally:
        stop.set()
        if reconciler is not None:
            await reconciler
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
