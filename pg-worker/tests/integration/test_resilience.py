"""Shutdown, crashes, lost connections and a restarting database."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pg_worker
from conftest import TESTS_DIR, PgServer
from helpers import RecordingObserver, marks, queue_rows, running_worker, wait_until
from pg_worker import App, Job, Outcome, PollSchedule, Producer, WakeupSource

TEN_MINUTES = PollSchedule(interval=600)


class WorkerProcess:
    def __init__(self, db_url: str, work_dir: Path, app: str = "apps:slow_app", **env: str) -> None:
        self.work_dir = work_dir
        self.log = open(work_dir / "worker.log", "w+")  # noqa: SIM115 - closed in kill(); a file, not a pipe: a full pipe would block the worker
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pg_worker", "run", app, "--log-format", "json", "--poll-interval", "600s"],
            env={
                **os.environ,
                "DATABASE_URL": db_url,
                "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
                "PGW_TEST_DIR": str(work_dir),
                "PG_WORKER_METRICS_PORT": "0",  # any free port: never collide with a worker running on this machine
                **env,
            },
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def markers(self, what: str) -> list[str]:
        return sorted(p.name for p in self.work_dir.glob(f"{what}-*"))

    def wait(self, timeout: float = 30) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self.log.seek(0)
        return code, self.log.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def processes() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for process in started:
        process.kill()


async def _wait_for_marker(process: WorkerProcess, what: str, count: int = 1, limit: float = 20) -> None:
    await wait_until(lambda: len(process.markers(what)) >= count or process.proc.poll() is not None, timeout=limit, interval=0.02, what=what)
    if process.proc.poll() is not None:
        raise AssertionError(f"worker exited early: {process.wait()}")


@pytest.mark.parametrize("app", ["apps:async_slow_app", "apps:slow_app"])
async def test_sigterm_lets_short_jobs_finish_hands_back_long_ones_and_exits_0(app: str, db_url: str, work_dir: Path, processes: list[WorkerProcess], producer: Producer) -> None:
    await pg_worker.install(db_url, ["slow"])
    short_id = producer.enqueue("slow", {"seconds": 0.5})
    long_id = producer.enqueue("slow", {"seconds": 30})
    worker = WorkerProcess(db_url, work_dir, app, PG_WORKER_SHUTDOWN_GRACE="1.5")
    processes.append(worker)
    await _wait_for_marker(worker, "started", 2)
    worker.proc.send_signal(signal.SIGTERM)
    code, output = await asyncio.to_thread(worker.wait)
    assert code == 0, output
    assert worker.markers("done") == [m.replace("started", "done") for m in worker.markers("started") if m.startswith(f"started-{short_id}-")]
    rows = await queue_rows(db_url, "slow")
    assert [r[0] for r in rows] == [long_id], "the long job is back"
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT vt <= clock_timestamp(), read_ct, headers->>'x-pg-worker-handbacks' FROM pgmq.q_slow")
        state = await cur.fetchone()
    if app == "apps:async_slow_app":
        # read_ct only grows (it fences every write); the handed-back delivery is counted apart, not as an attempt
        assert state == (True, 1, "1"), "handed back: visible again at once, its delivery not counted"
        assert '"event": "jobs_handed_back"' in output
    else:
        # A thread cannot be stopped: its message is not made visible while it might still run; it comes back
        # when its lease ends, after the process (and the thread with it) is gone.
        assert state == (False, 1, "1"), "a sync job still running stays leased; its cut delivery is not an attempt"
        assert '"event": "sync_jobs_abandoned"' in output and '"event": "jobs_abandoned"' in output
    assert await marks(db_url) == 0, "a stopped worker withdraws its waiting marks"


async def test_a_second_signal_exits_at_once(db_url: str, work_dir: Path, processes: list[WorkerProcess], producer: Producer) -> None:
    await pg_worker.install(db_url, ["slow"])
    producer.enqueue("slow", {"seconds": 30})
    worker = WorkerProcess(db_url, work_dir, PG_WORKER_SHUTDOWN_GRACE="60")
    processes.append(worker)
    await _wait_for_marker(worker, "started")
    worker.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    stopped_at = time.monotonic()
    worker.proc.send_signal(signal.SIGINT)
    code, output = await asyncio.to_thread(worker.wait, 10)
    assert time.monotonic() - stopped_at < 3
    assert code == 1
    assert "shutdown_forced" in output


async def test_a_job_of_a_killed_worker_runs_again_after_its_visibility_timeout(db_url: str, work_dir: Path, processes: list[WorkerProcess], producer: Producer) -> None:
    await pg_worker.install(db_url, ["slow"])
    msg_id = producer.enqueue("slow", {"seconds": 30})
    first = WorkerProcess(db_url, work_dir, PGW_TEST_VT="2")
    processes.append(first)
    await _wait_for_marker(first, "started")
    killed_at = time.monotonic()
    first.proc.send_signal(signal.SIGKILL)
    first.wait()

    # the message is still leased: a new worker must not get it before the visibility timeout ends
    app = App()
    app.queue("slow", visibility_timeout=2)
    seen: list[tuple[int, int, float]] = []

    @app.handler("slow")
    async def handle(job: Job[dict[str, Any]]) -> None:
        seen.append((job.msg_id, job.attempt, time.monotonic()))

    async with running_worker(app, db_url, RecordingObserver(), poll=TEN_MINUTES):
        await wait_until(lambda: seen, timeout=10, what="second delivery")
    assert seen[0][:2] == (msg_id, 2)
    assert seen[0][2] - killed_at >= 1.0, "not before the lease of the killed worker ran out"


async def test_a_long_job_keeps_its_lease_so_no_other_worker_runs_it_meanwhile(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("long", visibility_timeout=1)
    runs: list[tuple[str, int]] = []

    @app.handler("long")
    async def handle(job: Job[dict[str, Any]]) -> None:
        runs.append((asyncio.current_task().get_name(), job.msg_id))  # type: ignore[union-attr]
        await asyncio.sleep(2.5)

    await pg_worker.install(db_url, ["long"])
    producer.enqueue("long", {})
    poll = PollSchedule(interval=0.2)
    async with running_worker(app, db_url, RecordingObserver(), poll=poll, worker_id="one"), running_worker(
        app, db_url, RecordingObserver(), poll=poll, worker_id="two"
    ):
        await wait_until(lambda: runs, what="first run")
        await asyncio.sleep(3.0)  # three visibility timeouts: without renewal the other worker would take it
    assert len(runs) == 1
    assert await queue_rows(db_url, "long") == []


async def test_killed_listen_connection_reconnects_and_catches_up(db_url: str, producer: Producer) -> None:
    app = App()
    handled: list[int] = []
    app.add_handler("jobs", lambda job: handled.append(job.msg_id))
    await pg_worker.install(db_url, ["jobs"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES, listen_reconnect_max=1.0, degraded_poll_interval=30) as worker:
        assert worker.listener is not None
        pid = worker.listener.pid
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await wait_until(lambda: not worker.health.listening, what="listener down")
            msg_id = producer.enqueue("jobs", {"sent": "while nobody listened"})
            await wait_until(lambda: msg_id in handled, timeout=5, what="catch-up after reconnect")
            # the message may be handled before LISTEN is back (a fetch already under way takes it): wait for the
            # reconnect itself, then check that it is a new connection
            await wait_until(lambda: worker.health.listening, timeout=5, what="listener back")
        assert worker.listener.pid != pid
        assert observer.listen_states[-2:] == [False, True]
        # the new LISTEN works: a fresh message is notified, not polled
        await wait_until(lambda: _marked(db_url, worker), what="marked again")
        second = producer.enqueue("jobs", {})
        await wait_until(lambda: second in handled, timeout=1, what="notified job")
    sources = [s for _, s, _ in observer.wakeups]
    assert WakeupSource.RECONNECT in sources
    assert sources[-1] is WakeupSource.NOTIFY


async def _marked(url: str, worker: pg_worker.Worker) -> bool:
    return await marks(url, worker.config.worker_id) == 1


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_worker_carries_on_when_postgres_stops_and_restarts(pg_server: PgServer, db_url: str, producer: Producer, mode: str) -> None:
    """``immediate`` is a crash: pgmq's UNLOGGED throttle table would come back empty and its NOTIFY go silent."""
    app = App()
    handled: list[int] = []
    release = asyncio.Event()

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        if job.payload.get("wait"):
            await release.wait()
        handled.append(job.msg_id)

    await pg_worker.install(db_url, ["jobs"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=TEN_MINUTES, listen_reconnect_max=0.5, db_retry_max=0.5) as worker:
        in_flight = producer.enqueue("jobs", {"wait": True})
        await wait_until(lambda: worker.in_flight == 1, what="job in flight")
        producer.close()
        await asyncio.to_thread(pg_server.pg_ctl, "stop", "-m", mode, "-w")
        release.set()  # the job finishes while the database is down: its acknowledgement has to wait
        await asyncio.sleep(1.0)
        await asyncio.to_thread(pg_server.pg_ctl, "start", "-w", "-o", f"-h '' -k {pg_server.handle.get_postmaster_info().socket_dir}", "-l", str(pg_server.handle.log))
        await wait_until(lambda: worker.health.listening, timeout=15, what="listener back")
        await wait_until(lambda: _marked(db_url, worker), timeout=15, what="marked after restart")
        await wait_until(lambda: _queue_empty(db_url), timeout=15, what="acknowledgement sent after restart")
        after = producer.enqueue("jobs", {})
        await wait_until(lambda: after in handled, timeout=2, what="job sent after the restart")
    assert in_flight in handled
    assert observer.db_errors, "the outage was noticed and counted"
    assert observer.outcomes(Outcome.SUCCEEDED)


async def _queue_empty(url: str) -> bool:
    return await queue_rows(url, "jobs") == []


async def test_while_listen_cannot_connect_the_worker_polls_and_says_so(db_url: str, producer: Producer, caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    handled: list[int] = []
    app.add_handler("jobs", lambda job: handled.append(job.msg_id))
    await pg_worker.install(db_url, ["jobs"])
    observer = RecordingObserver()
    unreachable = "postgresql://nobody@/nowhere?host=/nonexistent-socket-dir&connect_timeout=1"
    config = pg_worker.WorkerConfig(poll=TEN_MINUTES, degraded_poll_interval=0.3, listen_reconnect_max=0.2, worker_id="deaf")
    worker = pg_worker.Worker(app, db_url, config, observers=[observer], listen_conninfo=unreachable)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: observer.wakeups, what="start-up drain")
        await asyncio.sleep(0.1)  # let the start-up drain finish: the message must be found by a poll
        msg_id = producer.enqueue("jobs", {})
        await wait_until(lambda: msg_id in handled, timeout=3, what="job found by the degraded poll")
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
    assert worker.health.listening is False
    assert WakeupSource.POLL in {s for _, s, _ in observer.wakeups}
    failures = [r for r in caplog.records if r.getMessage() == "listen_connect_failed"]
    assert failures, "the log says that LISTEN is down"
    assert failures[0].polling_every_s == 0.3


@pytest.mark.slow
async def test_after_a_postgres_restart_under_load_work_resumes_within_a_second_and_the_backlog_drains_at_full_speed(pg_server: PgServer, db_url: str) -> None:
    app = App()
    app.queue("jobs", batch_size=50)
    handled: list[float] = []
    app.add_handler("jobs", lambda job: handled.append(time.monotonic()))
    stop_producing = asyncio.Event()

    async def produce() -> None:
        """About 600 jobs/s in batches of 20, through outages (bounded: it stops when told, at most 60 s)."""
        deadline = time.monotonic() + 60
        while not stop_producing.is_set() and time.monotonic() < deadline:
            try:
                async with await psycopg.AsyncConnection.connect(db_url, autocommit=True, connect_timeout=2) as conn:
                    while not stop_producing.is_set() and time.monotonic() < deadline:
                        await conn.execute("SELECT pgmq.send_batch('jobs', array_fill('{}'::jsonb, ARRAY[20]))")
                        await asyncio.sleep(0.033)
            except psycopg.OperationalError:
                await asyncio.sleep(0.05)

    await pg_worker.install(db_url, ["jobs"])
    async with running_worker(app, db_url, RecordingObserver(), poll=TEN_MINUTES, concurrency=100):
        producer = asyncio.create_task(produce())
        try:
            await asyncio.sleep(3.0)
            before = sum(1 for t in handled if t > time.monotonic() - 2.0) / 2.0
            await asyncio.to_thread(pg_server.pg_ctl, "stop", "-m", "fast", "-w")
            await asyncio.sleep(10.0)  # long enough for reconnect backoffs to grow (the pool's 1, 2, 4, 8 s; LISTEN's)
            await asyncio.to_thread(pg_server.pg_ctl, "start", "-w", "-o", f"-h '' -k {pg_server.handle.get_postmaster_info().socket_dir}", "-l", str(pg_server.handle.log))
            back = time.monotonic()
            await wait_until(lambda: handled and handled[-1] > back, timeout=15, what="work after the restart")
            first = handled[-1] - back
            await asyncio.sleep(4.0)
            after = sum(1 for t in handled if back + 1.0 < t <= back + 4.0) / 3.0
        finally:
            stop_producing.set()
            await producer
    assert first < 1.0, f"the first job ran {first:.2f}s after the database was back"
    assert after > 0.8 * before, f"{after:.0f} jobs/s in the seconds after the restart, {before:.0f} before"
