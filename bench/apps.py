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


def recording_app() -> App:
    """No-op jobs whose msg_ids (and attempts) are written to $BENCH_OUT/<pid>.ids when the worker exits."""
    import atexit
    import os

    seen: list[str] = []
    out = os.environ["BENCH_OUT"]

    def dump() -> None:
        with open(os.path.join(out, f"{os.getpid()}.ids"), "w") as f:
            f.write("\n".join(seen))

    atexit.register(dump)
    app = App()

    @app.handler("jobs")
    async def record(job: Job[dict[str, Any]]) -> None:
        seen.append(f"{job.msg_id} {job.attempt}")

    return app
