"""``wl-workers run``: a pg-worker Worker serving wl-workers' App, with pg-worker's /metrics, /healthz and
/readyz (our per-device metrics included), signal handling, and the optional periodic reconcile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from pg_worker import SetupError, Worker
from pg_worker.health import HealthProbe
from pg_worker.metrics import instrument
from pg_worker.observability import ObservabilityServer
from pg_worker.settings import WorkerSettings

from ._migrate import pending_migrations
from .app import build_app
from .metrics import COLLECTORS
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
    worker = Worker(build_app(conninfo, settings), conninfo, wsettings.worker_config(), listen_conninfo=wsettings.listen_url)
    loop = asyncio.get_running_loop()
    server = None
    if wsettings.metrics:
        metrics = instrument(worker, stats_max_age=wsettings.queue_stats_interval)
        for collector in COLLECTORS:
            metrics.registry.register(collector)
        try:
            server = ObservabilityServer(HealthProbe(worker), metrics, loop, host=wsettings.metrics_host, port=wsettings.metrics_port).start()
        except OSError as exc:
            raise SetupError(f"cannot serve /metrics on {wsettings.metrics_host}:{wsettings.metrics_port}: {exc.strerror or exc}") from exc
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            logger.info("shutdown_requested", extra={"event": "shutdown_requested", "signal": signal.Signals(signum).name})
            worker.request_stop()
        else:
            logger.warning("shutdown_forced", extra={"event": "shutdown_forced", "signal": signal.Signals(signum).name})
            logging.shutdown()
            os._exit(1)  # unfinished messages come back after their visibility timeout

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    stop = asyncio.Event()
    reconciler = asyncio.create_task(_periodic_reconcile(conninfo, settings, stop)) if settings.reconcile_interval > 0 else None
    try:
        await worker.run()
    finally:
        stop.set()
        if reconciler is not None:
            await reconciler
        if server is not None:
            server.stop()
    return worker
