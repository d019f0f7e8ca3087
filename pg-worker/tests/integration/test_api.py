"""The API services build on (issue 18 item 9): deferrals that use no attempt, readiness with a reason, stopping
with a failure, lifespans with shared state, supervised background tasks, and extra Prometheus collectors."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter, generate_latest

import pg_worker
from conftest import TESTS_DIR
from helpers import RecordingObserver, dlq_messages, queue_rows, running_worker, wait_until
from pg_worker import (
    App,
    Job,
    Outcome,
    Producer,
    Readiness,
    RetryLater,
    RetryPolicy,
    Worker,
    WorkerConfig,
    WorkerFailure,
)
from pg_worker.health import HealthProbe
from pg_worker.metrics import instrument
from pg_worker.observability import ObservabilityServer


def _metric(metrics: Any, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


# -- RetryLater(count_attempt=False) ---------------------------------------------------------------------------


async def test_a_deferral_uses_no_attempt_and_never_dead_letters(db_url: str, producer: Producer) -> None:
    """Deferred five times on a queue that allows two attempts: still attempt 1, then two real failures reach
    the DLQ with attempts=2. Deferrals are counted as ``deferred``, not as retries or failures."""
    app = App()
    app.queue("busy", retry=RetryPolicy(max_attempts=2, base_delay=0, jitter=0))
    attempts: list[int] = []

    @app.handler("busy")
    async def handle(job: Job[dict[str, Any]]) -> None:
        attempts.append(job.attempt)
        if len(attempts) <= 5:
            raise RetryLater(0, "device busy", count_attempt=False)
        raise RuntimeError("router said no")

    worker = Worker(app, db_url, WorkerConfig(worker_id="defer"))
    metrics = instrument(worker)
    await pg_worker.install(db_url, app.queues)
    producer.enqueue("busy", {"n": 1})
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: dlq_messages(db_url, "busy"), timeout=30, what="the dead letter after the real failures")
    finally:
        worker.request_stop()
        await task
    assert attempts == [1, 1, 1, 1, 1, 1, 2]
    (dead,) = await dlq_messages(db_url, "busy")
    assert dead["attempts"] == 2 and dead["error"]["reason"] == "max_attempts"
    assert _metric(metrics, "pg_worker_jobs_total", queue="busy", outcome="deferred") == 5
    assert _metric(metrics, "pg_worker_jobs_total", queue="busy", outcome="retried") == 1
    assert _metric(metrics, "pg_worker_job_failures_total", queue="busy", error_type="RetryLater") == 0


async def test_a_deferral_at_the_last_attempt_is_not_dead_lettered(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("busy", retry=RetryPolicy(max_attempts=1))
    seen: list[int] = []

    @app.handler("busy")
    async def handle(job: Job[dict[str, Any]]) -> None:
        seen.append(job.attempt)
        if len(seen) <= 3:
            raise RetryLater(0, count_attempt=False)

    observer = RecordingObserver()
    async with running_worker(app, db_url, observer):
        producer.enqueue("busy", {})
        await wait_until(lambda: observer.outcomes(Outcome.SUCCEEDED), timeout=30, what="success after the deferrals")
    assert seen == [1, 1, 1, 1]
    assert [f.outcome for f in observer.finished] == [Outcome.DEFERRED] * 3 + [Outcome.SUCCEEDED]
    assert await dlq_messages(db_url, "busy") == []


def test_retry_later_refuses_delays_sql_cannot_take() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            RetryLater(bad)
    assert RetryPolicy(max_attempts=1).decide(1, RetryLater(3, count_attempt=False)) == 3
    assert RetryPolicy(max_attempts=1).decide(1, RetryLater(3)) is None


# -- readiness with a reason, and stopping with a failure -------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_readiness_reasons_are_served_in_readyz_and_logged_when_they_change(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    app.queue("jobs")
    app.add_handler("jobs", lambda job: None)
    state = {"answer": Readiness(False, "router 10.9.0.1 unreachable")}

    @app.readiness_check("device_network")
    async def device_network() -> Readiness:
        return state["answer"]

    @app.readiness_check("plain")
    def plain() -> bool:
        return True

    caplog.set_level(logging.INFO, logger="pg_worker.health")
    async with running_worker(app, db_url) as worker:
        server = ObservabilityServer(HealthProbe(worker), instrument(worker), asyncio.get_running_loop(), port=0).start()
        try:
            status, body = await asyncio.to_thread(_get, server.port, "/readyz")
            assert status == 503
            checks = {c["name"]: c for c in body["checks"]}
            assert checks["device_network"] == {"name": "device_network", "ok": False, "detail": "router 10.9.0.1 unreachable"}
            assert checks["plain"]["ok"] and checks["plain"]["detail"] == "ok"
            await asyncio.to_thread(_get, server.port, "/readyz")  # the same answer: not logged again
            state["answer"] = Readiness(True)
            status, body = await asyncio.to_thread(_get, server.port, "/readyz")
            assert status == 200, body
        finally:
            server.stop()
    changes = [(r.check, r.ok, r.reason) for r in caplog.records if getattr(r, "event", None) == "readiness_changed"]  # type: ignore[attr-defined]
    assert changes == [("device_network", False, "router 10.9.0.1 unreachable"), ("device_network", True, "ok")]


async def test_a_readiness_check_raising_worker_failure_stops_the_worker_with_that_failure(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs")
    app.add_handler("jobs", lambda job: None)

    @app.readiness_check("vpn")
    def vpn() -> bool:
        raise WorkerFailure("tunnel wg0 is gone")

    worker = Worker(app, db_url, WorkerConfig(worker_id="ready-fail"))
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: worker.health.started, what="start")
    report = await HealthProbe(worker).readiness()
    assert not report.ok and {c.name: c.detail for c in report.checks}["vpn"] == "tunnel wg0 is gone"
    assert {c.name: c.detail for c in (await HealthProbe(worker).readiness()).checks}["worker"] == "stopping: readiness check vpn: tunnel wg0 is gone"
    with pytest.raises(WorkerFailure, match="readiness check vpn: tunnel wg0 is gone"):
        await asyncio.wait_for(task, timeout=30)
    assert worker.failure == "readiness check vpn: tunnel wg0 is gone"


async def test_stop_with_a_failure_lets_the_running_job_finish_then_run_raises(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs")
    started, release = asyncio.Event(), asyncio.Event()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        started.set()
        await release.wait()

    observer = RecordingObserver()
    worker = Worker(app, db_url, WorkerConfig(worker_id="stop-fail", shutdown_grace=30), observers=[observer])
    await pg_worker.install(db_url, app.queues)
    task = asyncio.create_task(worker.run())
    producer.enqueue("jobs", {})
    await asyncio.wait_for(started.wait(), timeout=20)
    worker.stop(failure="the device network is gone")
    worker.stop(failure="a later reason is not the one reported")
    await asyncio.sleep(0.2)
    assert not task.done()  # graceful: the job still runs
    release.set()
    with pytest.raises(WorkerFailure, match=r"^the device network is gone$"):
        await asyncio.wait_for(task, timeout=30)
    assert [f.outcome for f in observer.finished] == [Outcome.SUCCEEDED]
    assert await queue_rows(db_url, "jobs") == []


# -- lifespans, background tasks, collectors ---------------------------------------------------------------------


async def test_lifespan_wraps_every_job_and_background_tasks_run_inside_it(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs")
    events: list[str] = []
    ticking = asyncio.Event()

    @app.lifespan
    async def pool(app: App) -> AsyncIterator[None]:
        events.append("pool open")
        app.state.pool = "the pool"
        yield
        events.append("pool closed")

    @app.lifespan
    async def client(app: App) -> AsyncIterator[None]:
        events.append(f"client open (with {app.state.pool})")
        yield
        events.append("client closed")

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        events.append(f"job {job.payload['n']} uses {app.state.pool}")

    @app.background_task("ticker")
    async def ticker(app: App) -> None:
        events.append("ticker started")
        ticking.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("ticker cancelled")
            raise

    await pg_worker.install(db_url, app.queues)
    producer.enqueue("jobs", {"n": 1})
    worker = Worker(app, db_url, WorkerConfig(worker_id="lifespan"))
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(ticking.wait(), timeout=20)
    await wait_until(lambda: "job 1 uses the pool" in events, what="the job")
    worker.request_stop()
    await asyncio.wait_for(task, timeout=30)
    assert events[:2] == ["pool open", "client open (with the pool)"]
    assert set(events[2:4]) == {"ticker started", "job 1 uses the pool"}
    assert events[4:] == ["ticker cancelled", "client closed", "pool closed"]
    assert worker.failure is None


async def test_a_lifespan_that_fails_to_start_runs_no_job(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs")
    ran: list[int] = []
    app.add_handler("jobs", lambda job: ran.append(job.msg_id))

    @app.lifespan
    async def pool(app: App) -> AsyncIterator[None]:
        raise ConnectionRefusedError("billing database refused the connection")
        yield  # pragma: no cover

    await pg_worker.install(db_url, app.queues)
    producer.enqueue("jobs", {})
    with pytest.raises(WorkerFailure, match=r"lifespan .*pool failed at start: ConnectionRefusedError: billing database refused"):
        await asyncio.wait_for(pg_worker.run_worker(app, db_url, WorkerConfig(worker_id="bad-lifespan")), timeout=30)
    assert ran == []
    assert [row[1] for row in await queue_rows(db_url, "jobs")] == [0]  # never read


def test_lifespans_and_background_tasks_are_checked_at_registration() -> None:
    app = App()

    async def not_a_generator(app: App) -> None: ...

    with pytest.raises(TypeError, match="async generator function"):
        app.lifespan(not_a_generator)  # type: ignore[arg-type]
    app.background_task("sync")(not_a_generator)
    with pytest.raises(ValueError, match="already registered"):
        app.background_task("sync")(not_a_generator)
    with pytest.raises(TypeError, match="not a Prometheus collector"):
        app.add_collector(object())  # type: ignore[arg-type]


@pytest.mark.parametrize("raised", [WorkerFailure("the VPN is down"), KeyError("device")])
async def test_a_background_task_that_raises_stops_the_worker_with_a_failure(db_url: str, producer: Producer, raised: Exception) -> None:
    app = App()
    app.queue("jobs")
    started, release = asyncio.Event(), asyncio.Event()
    trigger = asyncio.Event()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        started.set()
        await release.wait()

    @app.background_task("watch")
    async def watch(app: App) -> None:
        await trigger.wait()
        raise raised

    observer = RecordingObserver()
    worker = Worker(app, db_url, WorkerConfig(worker_id="bg-fail"), observers=[observer])
    await pg_worker.install(db_url, app.queues)
    task = asyncio.create_task(worker.run())
    producer.enqueue("jobs", {})
    await asyncio.wait_for(started.wait(), timeout=20)
    trigger.set()
    await wait_until(lambda: worker.health.stopping, what="stop requested")
    release.set()
    expected = "background task watch: the VPN is down" if isinstance(raised, WorkerFailure) else "background task watch failed: KeyError: 'device'"
    with pytest.raises(WorkerFailure) as info:
        await asyncio.wait_for(task, timeout=30)
    assert str(info.value) == expected
    assert [f.outcome for f in observer.finished] == [Outcome.SUCCEEDED]  # the running job finished first


async def test_added_collectors_are_served_in_metrics(db_url: str) -> None:
    app = App()
    app.queue("jobs")
    app.add_handler("jobs", lambda job: None)
    from prometheus_client import CollectorRegistry

    devices = Counter("wl_test_device_actions", "Device actions.", ["device"], registry=CollectorRegistry())
    devices.labels("r1").inc(3)
    app.add_collector(devices)
    worker = Worker(app, db_url, WorkerConfig(worker_id="collectors"))
    text = generate_latest(instrument(worker).registry).decode()
    assert 'wl_test_device_actions_total{device="r1"} 3.0' in text
    assert "pg_worker_jobs_total" in text


def test_pg_worker_run_exits_1_and_logs_the_failure_reason(db_url: str, tmp_path: Path) -> None:
    """Through the command: a background task's WorkerFailure ends `pg-worker run` with status 1."""
    asyncio.run(pg_worker.install(db_url, ["slow"]))
    proc = subprocess.run(
        [sys.executable, "-m", "pg_worker", "run", "apps:failing_app", "--metrics", "false"],
        env={**os.environ, "DATABASE_URL": db_url, "PG_WORKER_LOG_FORMAT": "json", "PYTHONPATH": str(TESTS_DIR), "PGW_TEST_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    failure = next(r for r in records if r["event"] == "worker_failure")
    assert failure["reason"] == "background task watchdog: the device network is gone"
    assert records[-1]["event"] == "cli_error" and records[-1]["exit_code"] == 1
    assert "the device network is gone" in records[-1]["error"]
