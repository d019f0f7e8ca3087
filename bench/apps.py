"""Apps the benchmark runs in worker processes (``pg-worker run bench.apps:<name>``)."""

from __future__ import annotations

from typing import Any

from pg_worker import App, Job


def noop_app() -> App:
    app = App()

    @app.handler("jobs")
    async def noop(job: Job[dict[str, Any]]) -> None:
        return None

    return app
