"""Apps that worker subprocesses in the tests run (``pg-worker run apps:<name>``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pg_worker import App, Job


def _record(job: Job[Any], what: str) -> None:
    marker = Path(os.environ["PGW_TEST_DIR"]) / f"{what}-{job.msg_id}-{job.attempt}-{os.getpid()}"
    marker.write_text("")


def slow_app() -> App:
    """Handlers that announce they started, then sleep for the payload's ``seconds``."""
    app = App()
    app.queue("slow", visibility_timeout=int(os.environ.get("PGW_TEST_VT", "30")))

    @app.handler("slow")
    def handle(job: Job[dict[str, Any]]) -> None:
        _record(job, "started")
        time.sleep(float(job.payload.get("seconds", 0)))
        _record(job, "done")

    return app


def async_slow_app() -> App:
    """Like :func:`slow_app`, with an async handler (which shutdown can interrupt and hand back)."""
    import asyncio

    app = App()
    app.queue("slow", visibility_timeout=int(os.environ.get("PGW_TEST_VT", "30")))

    @app.handler("slow")
    async def handle(job: Job[dict[str, Any]]) -> None:
        _record(job, "started")
        await asyncio.sleep(float(job.payload.get("seconds", 0)))
        _record(job, "done")

    return app


def poison_app() -> App:
    """A queue where a message with ``{"poison": true}`` kills the worker process mid-job (like a segfault)."""
    app = App()
    app.queue("batch", visibility_timeout=1)

    @app.handler("batch")
    async def handle(job: Job[dict[str, Any]]) -> None:
        import asyncio

        _record(job, "started")
        if job.payload.get("poison"):
            os._exit(70)
        await asyncio.sleep(0.3)  # batch-mates are still running when the poison one kills the process
        _record(job, "done")

    return app


def failing_app() -> App:
    """A worker whose background task gives up at once: `pg-worker run` must stop and exit with status 1."""
    from pg_worker import WorkerFailure

    app = App()
    app.queue("slow")
    app.add_handler("slow", lambda job: None)

    @app.background_task("watchdog")
    async def watchdog(app: App) -> None:
        raise WorkerFailure("the device network is gone")

    return app
