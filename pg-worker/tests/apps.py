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
