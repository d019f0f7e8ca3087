"""The pg-worker command: every admin command with its error paths, logs, and a DLQ replay that runs a job again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pg_worker
from conftest import TESTS_DIR
from helpers import RecordingObserver, dlq_messages, queue_rows, running_worker, wait_until
from pg_worker import App, Job, Outcome, PermanentFailure, PollSchedule


def cli(url: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pg_worker", *args],
        env={**os.environ, "DATABASE_URL": url, "PG_WORKER_LOG_FORMAT": "json", "PG_WORKER_METRICS_PORT": "0", "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def dead_letters(db_url: str) -> str:
    """A queue 'jobs' with three dead letters (msg_ids 1-3 in jobs_dlq) and nothing else."""
    app = App()

    @app.handler("jobs")
    async def fail(job: Job[dict[str, Any]]) -> None:
        raise PermanentFailure(f"customer {job.payload['customer']} unknown")

    asyncio.run(pg_worker.install(db_url, ["jobs"]))
    with pg_worker.Producer(db_url) as producer:
        producer.enqueue_many("jobs", [{"customer": n} for n in (1, 2, 3)])
    # one at a time, so that dead-letter ids follow the customers: jobs_dlq 1, 2, 3 = customers 1, 2, 3
    asyncio.run(pg_worker.run_worker(app, db_url, pg_worker.WorkerConfig(concurrency=1), stop_when_idle=True))
    return db_url


def test_queues_lists_depths_as_a_table_and_as_json(db_url: str) -> None:
    asyncio.run(pg_worker.install(db_url, ["jobs", "mail"]))
    with pg_worker.Producer(db_url) as producer:
        producer.enqueue_many("jobs", [{}, {}])
        producer.enqueue("jobs", {}, delay=600)
    table = cli(db_url, "queues")
    assert table.returncode == 0, table.stderr
    assert "jobs" in table.stdout and "mail" in table.stdout and "jobs_dlq" not in table.stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT pgmq.create('foreign')")  # a queue made by someone else, without a DLQ
    rows = {r["queue"]: r for r in json.loads(cli(db_url, "queues", "--json").stdout)}
    assert rows["foreign"]["dlq_depth"] == 0
    assert (rows["jobs"]["depth"], rows["jobs"]["visible"], rows["jobs"]["delayed"], rows["jobs"]["dlq_depth"]) == (3, 2, 1, 0)
    assert rows["mail"]["depth"] == 0


def test_send_and_its_error_paths(db_url: str) -> None:
    asyncio.run(pg_worker.install(db_url, ["jobs"]))
    ok = cli(db_url, "send", "jobs", '{"customer": 5}', "--delay", "30", "--type", "activate")
    assert ok.returncode == 0, ok.stderr
    [row] = asyncio.run(queue_rows(db_url, "jobs"))
    assert (row[0], row[3]) == (int(ok.stdout), {"customer": 5, "type": "activate"})

    bad_json = cli(db_url, "send", "jobs", "{customer: 5}")
    assert (bad_json.returncode, "not valid JSON" in bad_json.stderr) == (2, True)
    not_object = cli(db_url, "send", "jobs", "[1]")
    assert (not_object.returncode, "must be a JSON object" in not_object.stderr) == (2, True)
    bad_name = cli(db_url, "send", "Jobs", "{}")
    assert (bad_name.returncode, "lowercase" in bad_name.stderr) == (2, True)
    missing = cli(db_url, "send", "nowhere", "{}")
    assert missing.returncode == 2
    assert "no such queue 'nowhere'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_dlq_list_and_show(dead_letters: str) -> None:
    listed = cli(dead_letters, "dlq", "list", "jobs")
    assert listed.returncode == 0, listed.stderr
    assert "permanent_failure" in listed.stdout and "customer 2 unknown" in listed.stdout
    as_json = json.loads(cli(dead_letters, "dlq", "list", "jobs_dlq", "--json", "--limit", "2").stdout)
    assert [d["dlq_id"] for d in as_json] == [1, 2]
    shown = cli(dead_letters, "dlq", "show", "jobs", "3")
    assert shown.returncode == 0
    body = json.loads(shown.stdout)
    assert (body["queue"], body["message"], body["error"]["reason"]) == ("jobs", {"customer": 3}, "permanent_failure")

    missing = cli(dead_letters, "dlq", "show", "jobs", "42")
    assert (missing.returncode, "no dead letter with dlq_id 42 in jobs_dlq" in missing.stderr) == (1, True)
    unknown = cli(dead_letters, "dlq", "list", "nosuch")
    assert (unknown.returncode, "no such dead-letter queue 'nosuch_dlq'" in unknown.stderr) == (2, True)
    empty = cli(dead_letters, "dlq", "list", "jobs", "--limit", "0")
    assert empty.returncode == 0 and "no dead letters" in empty.stdout


def test_dlq_purge_one_then_all_and_its_errors(dead_letters: str) -> None:
    assert cli(dead_letters, "dlq", "purge", "jobs").returncode == 2, "neither ids nor --all"
    assert cli(dead_letters, "dlq", "purge", "jobs", "1", "--all").returncode == 2, "both"
    partly = cli(dead_letters, "dlq", "purge", "jobs", "1", "99")
    assert partly.returncode == 1 and "no such dlq_id in jobs_dlq: 99; nothing changed" in partly.stderr
    assert len(asyncio.run(dlq_messages(dead_letters, "jobs"))) == 3
    one = cli(dead_letters, "dlq", "purge", "jobs", "2")
    assert one.stdout.splitlines()[0] == "purged 1 message(s) from jobs_dlq"
    rest = cli(dead_letters, "dlq", "purge", "jobs_dlq", "--all")
    assert rest.stdout.splitlines()[0] == "purged 2 message(s) from jobs_dlq"
    assert asyncio.run(dlq_messages(dead_letters, "jobs")) == []


async def test_dlq_replay_makes_the_job_run_again_with_attempts_reset(dead_letters: str) -> None:
    app = App()
    ran: list[tuple[dict[str, Any], int]] = []

    @app.handler("jobs")
    async def fixed(job: Job[dict[str, Any]]) -> None:  # the bug that dead-lettered them is fixed now
        ran.append((job.payload, job.attempt))

    observer = RecordingObserver()
    async with running_worker(app, dead_letters, observer, poll=PollSchedule(interval=600)):
        one = await asyncio.to_thread(cli, dead_letters, "dlq", "replay", "jobs", "2")
        assert one.returncode == 0, one.stderr
        assert one.stdout.splitlines()[0] == "replayed 1 message(s) to jobs"
        await wait_until(lambda: len(ran) == 1, what="replayed job")
        rest = await asyncio.to_thread(cli, dead_letters, "dlq", "replay", "jobs", "--all")
        assert rest.stdout.splitlines()[0] == "replayed 2 message(s) to jobs"
        await wait_until(lambda: len(ran) == 3, what="all replayed jobs")
    assert ran[0] == ({"customer": 2}, 1)
    assert sorted(ran[1:], key=lambda r: r[0]["customer"]) == [({"customer": 1}, 1), ({"customer": 3}, 1)]
    assert len(observer.outcomes(Outcome.SUCCEEDED)) == 3
    assert await dlq_messages(dead_letters, "jobs") == []
    missing = await asyncio.to_thread(cli, dead_letters, "dlq", "replay", "jobs", "1")
    assert missing.returncode == 1


def test_status_once_and_watching(db_url: str) -> None:
    asyncio.run(pg_worker.install(db_url, ["jobs"]))
    once = cli(db_url, "status", "--interval", "0.2")
    assert once.returncode == 0, once.stderr
    assert "in/s" in once.stdout and "jobs" in once.stdout
    watched = cli(db_url, "status", "--watch", "--interval", "0.2", "--iterations", "2")
    assert watched.returncode == 0, watched.stderr
    assert "done/s" in watched.stdout
    assert cli(db_url, "status", "--interval", "0").returncode == 2


def test_unreachable_database_and_bad_arguments_fail_cleanly(db_url: str) -> None:
    down = cli("postgresql://nobody@/nowhere?host=/nonexistent-dir&connect_timeout=1", "queues")
    assert down.returncode == 1 and "database error" in down.stderr and "Traceback" not in down.stderr
    assert cli(db_url, "frobnicate").returncode == 2
    assert cli(db_url, "run").returncode == 2, "no app"
    bad_app = cli(db_url, "run", "no_such_module:app")
    assert (bad_app.returncode, "cannot import module" in bad_app.stderr) == (2, True)
    bad_windows = cli(db_url, "run", "x:y", "--poll-windows", "sometimes")
    assert (bad_windows.returncode, "invalid poll window" in bad_windows.stderr) == (2, True)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = cli(db_url, "run", "apps:slow_app", "--metrics-port", str(taken.getsockname()[1]), PYTHONPATH=str(TESTS_DIR))
    assert busy.returncode == 1 and "cannot serve /metrics" in busy.stderr and "Traceback" not in busy.stderr
    help_text = cli(db_url, "run", "--help").stdout
    assert "[env: PG_WORKER_CONCURRENCY]" in help_text and "[env: PG_WORKER_METRICS_PORT]" in help_text


def test_worker_logs_are_json_with_job_fields_and_never_show_the_password(db_url: str, tmp_path: Path) -> None:
    asyncio.run(pg_worker.install(db_url, ["slow"]))
    secret_url = db_url.replace("postgresql://postgres:@", "postgresql://postgres:Sup3rS3cret@")
    with pg_worker.Producer(db_url) as producer:
        producer.enqueue("slow", {"seconds": 0})
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pg_worker", "run", "apps:slow_app", "--metrics", "false"],
            env={**os.environ, "DATABASE_URL": secret_url, "PG_WORKER_LOG_FORMAT": "json", "PG_WORKER_LOG_LEVEL": "DEBUG", "PYTHONPATH": str(TESTS_DIR), "PGW_TEST_DIR": str(tmp_path)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            asyncio.run(wait_until(lambda: "job_succeeded" in log_path.read_text(), timeout=20, what="job log"))
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    text = log_path.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    job = next(r for r in records if r["event"] == "job_succeeded")
    assert {"queue", "msg_id", "attempt", "duration_s", "outcome", "level", "timestamp"} <= job.keys()
    assert (job["queue"], job["msg_id"], job["attempt"], job["outcome"]) == ("slow", 1, 1, "succeeded")
    assert any(r["event"] == "database" and "[redacted]" not in r["url"] for r in records)
    assert "Sup3rS3cret" not in text


def test_install_from_the_cli_reports_what_it_did(db_url: str) -> None:
    first = cli(db_url, "install", "--queue", "alpha")
    assert first.returncode == 0, first.stderr
    assert "queues created: alpha, alpha_dlq" in first.stdout
    again = cli(db_url, "install", "--queue", "alpha")
    assert "queues created: none; wakeup triggers created: none" in again.stdout
    assert cli(db_url, "install", "--queue", "Alpha").returncode == 2
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pgmq.meta").fetchone() == (2,)


def test_queues_and_status_list_queues_pg_worker_would_not_create(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT pgmq.create('Billing_Events')")  # mixed case: made by another tool
        conn.execute("SELECT pgmq.create(%s)", ("q" * 45,))  # longer than pg-worker's own limit
        conn.execute("SELECT pgmq.send('Billing_Events', '{}')")
    listed = cli(db_url, "queues", "--json")
    assert listed.returncode == 0, listed.stderr
    stats = {row["queue"]: row for row in json.loads(listed.stdout)}
    assert stats["Billing_Events"]["depth"] == 1
    assert "q" * 45 in stats
    status = cli(db_url, "status")
    assert status.returncode == 0, status.stderr
    assert "Billing_Events" in status.stdout
