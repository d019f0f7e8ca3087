"""pg-worker as an operator meets it (issue 8): bad input at the CLI and producer, DLQ ids, start-up errors,
counters that exist before the first error, output that stays one format per stream."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from prometheus_client import generate_latest

import pg_worker
from conftest import TESTS_DIR
from helpers import dlq_messages, queue_rows
from pg_worker import App, AsyncProducer, Job, MessageTooLarge, PermanentFailure, Producer
from pg_worker.metrics import instrument

REPO = TESTS_DIR.parent.parent


def cli(url: str, *args: str, stdin: str | None = None, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run(
        [sys.executable, "-m", "pg_worker", *args],
        env={**base, "DATABASE_URL": url, "PG_WORKER_LOG_FORMAT": "json", "PG_WORKER_METRICS_PORT": "0", **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def json_lines(stream: str) -> list[dict[str, Any]]:
    """Every line of ``stream`` parsed as JSON: fails if any line is not."""
    return [json.loads(line) for line in stream.splitlines() if line.strip()]


# --- item 1: delays ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("delay", ["nan", "inf", "-inf", "-1", "1e12"])
def test_send_rejects_absurd_delays_with_exit_2_and_sends_nothing(db_url: str, delay: str) -> None:
    asyncio.run(pg_worker.install(db_url, ["jobs"]))
    sent = cli(db_url, "send", "jobs", "{}", f"--delay={delay}")
    assert sent.returncode == 2, sent.stderr
    assert "delay" in sent.stderr and "database error" not in sent.stderr
    assert asyncio.run(queue_rows(db_url, "jobs")) == []


def test_the_maximum_delay_is_configurable(db_url: str) -> None:
    asyncio.run(pg_worker.install(db_url, ["jobs"]))
    too_late = cli(db_url, "send", "jobs", "{}", "--delay", "120", PG_WORKER_MAX_DELAY="60")
    assert (too_late.returncode, "maximum" in too_late.stderr) == (2, True), too_late.stderr
    assert cli(db_url, "send", "jobs", "{}", "--delay", "120", "--max-delay", "600").returncode == 0
    assert len(asyncio.run(queue_rows(db_url, "jobs"))) == 1


async def test_producers_reject_absurd_delays_before_touching_the_database(db_url: str) -> None:
    await pg_worker.install(db_url, ["jobs"])
    with Producer(db_url, max_delay=60) as producer:
        for bad in (math.nan, math.inf, -1, 61, timedelta(days=10**6)):
            with pytest.raises(ValueError, match="delay"):
                producer.enqueue("jobs", {}, delay=bad)
            with pytest.raises(ValueError, match="delay"):
                producer.enqueue_many("jobs", [{}], delay=bad)
        producer.enqueue("jobs", {}, delay=60)
    async with AsyncProducer(db_url) as aproducer:
        with pytest.raises(ValueError, match="maximum"):
            await aproducer.enqueue("jobs", {}, delay=pg_worker.DEFAULT_MAX_DELAY + 1)
        await aproducer.enqueue("jobs", {}, delay=timedelta(days=30))
    with pytest.raises(ValueError, match="max_delay"):
        Producer(db_url, max_delay=math.inf)
    assert len(await queue_rows(db_url, "jobs")) == 2


# --- item 3: DLQ ids -----------------------------------------------------------------------------------------

@pytest.fixture
def dead_letters(db_url: str) -> str:
    """Queue 'jobs' whose original ids (5, 6) differ from the DLQ ids (1, 2)."""
    app = App()

    @app.handler("jobs")
    async def fail(job: Job[dict[str, Any]]) -> None:
        raise PermanentFailure(f"customer {job.payload['customer']} unknown")

    asyncio.run(pg_worker.install(db_url, ["jobs"]))
    with Producer(db_url) as producer:
        ids = producer.enqueue_many("jobs", [{"customer": n} for n in range(6)])
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("DELETE FROM pgmq.q_jobs WHERE msg_id = ANY(%s)", (ids[:4],))
    asyncio.run(pg_worker.run_worker(app, db_url, pg_worker.WorkerConfig(concurrency=1), stop_when_idle=True))
    return db_url


def test_dlq_ids_are_named_the_same_everywhere(dead_letters: str) -> None:
    listed = json.loads(cli(dead_letters, "dlq", "list", "jobs", "--json").stdout)
    assert [(d["dlq_id"], d["original_msg_id"]) for d in listed] == [(1, 5), (2, 6)]
    assert all("msg_id" not in d for d in listed), "an unqualified msg_id is ambiguous"
    table = cli(dead_letters, "dlq", "list", "jobs").stdout
    assert "dlq_id" in table and "original" in table
    shown = json.loads(cli(dead_letters, "dlq", "show", "jobs", "2").stdout)
    assert (shown["dlq_id"], shown["original_msg_id"], shown["message"]) == (2, 6, {"customer": 5})
    help_text = cli(dead_letters, "dlq", "replay", "--help").stdout
    assert "DLQ_ID" in help_text
    replayed = cli(dead_letters, "dlq", "replay", "jobs", "1")
    assert replayed.returncode == 0, replayed.stderr
    assert "dlq_id 1 -> msg_id 7" in replayed.stdout
    purged = cli(dead_letters, "dlq", "purge", "jobs", "2")
    assert "dlq_id 2" in purged.stdout
    assert asyncio.run(dlq_messages(dead_letters, "jobs")) == []


# --- item 5: missing queue -----------------------------------------------------------------------------------

def test_send_to_a_missing_queue_names_the_known_ones(db_url: str) -> None:
    asyncio.run(pg_worker.install(db_url, ["jobs", "mail"]))
    missing = cli(db_url, "send", "nosuchqueue", "{}")
    assert missing.returncode == 2
    assert "no such queue 'nosuchqueue'" in missing.stderr and "jobs, mail" in missing.stderr
    assert "PL/pgSQL" not in missing.stderr and "database error" not in missing.stderr
    unknown_dlq = cli(db_url, "dlq", "list", "nosuch")
    assert unknown_dlq.returncode == 2 and "jobs, mail" in unknown_dlq.stderr


# --- item 6: payloads from stdin and files, maximum size -------------------------------------------------------

def test_send_reads_the_payload_from_stdin_or_a_file(db_url: str, tmp_path: Path) -> None:
    asyncio.run(pg_worker.install(db_url, ["jobs"]))
    big = {"blob": "x" * 300_000}  # more than a command line takes
    from_stdin = cli(db_url, "send", "jobs", "-", stdin=json.dumps(big))
    assert from_stdin.returncode == 0, from_stdin.stderr
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"customer": 7}))
    from_file = cli(db_url, "send", "jobs", f"@{path}")
    assert from_file.returncode == 0, from_file.stderr
    missing = cli(db_url, "send", "jobs", f"@{tmp_path / 'nope.json'}")
    assert (missing.returncode, "cannot read payload" in missing.stderr) == (2, True)
    too_big = cli(db_url, "send", "jobs", "-", stdin=json.dumps(big), PG_WORKER_MAX_MESSAGE_SIZE="1000")
    assert (too_big.returncode, "too large" in too_big.stderr) == (2, True), too_big.stderr
    rows = asyncio.run(queue_rows(db_url, "jobs"))
    assert [r[3] for r in rows] == [big, {"customer": 7}]


async def test_producers_enforce_a_maximum_message_size(db_url: str) -> None:
    await pg_worker.install(db_url, ["jobs"])
    with Producer(db_url, max_message_size=1000) as producer:
        with pytest.raises(MessageTooLarge, match="1000"):
            producer.enqueue("jobs", {"blob": "x" * 1000})
        with pytest.raises(MessageTooLarge):
            producer.enqueue_many("jobs", [{}, {"blob": "é" * 600}])  # bytes, not characters
        producer.enqueue("jobs", {"blob": "x" * 900})
    async with AsyncProducer(db_url, max_message_size=1000) as aproducer:
        with pytest.raises(MessageTooLarge):
            await aproducer.enqueue("jobs", {"blob": "x" * 1000})
    assert issubclass(MessageTooLarge, ValueError)
    assert len(await queue_rows(db_url, "jobs")) == 1


# --- item 4 (CLI part): malformed DATABASE_URL; counters at zero -------------------------------------------------

def test_run_with_a_malformed_database_url_exits_at_once_with_the_reason(tmp_path: Path) -> None:
    bad = cli("postgresql://u:Secr3t@host:notaport/db", "run", "apps:slow_app", PYTHONPATH=str(TESTS_DIR), timeout=20)
    assert bad.returncode == 2, bad.stderr
    assert "DATABASE_URL" in bad.stderr and "port" in bad.stderr
    assert "Secr3t" not in bad.stderr
    for url, reason in (("host=x port", 'missing "="'), ("postgresql://u:Secr3t@h/db?frob=1", "frob"), ("postgres//u:Secr3t@h/db", 'missing "="')):
        garbage = cli(url, "queues", timeout=20)
        [record] = json_lines(garbage.stderr)
        assert garbage.returncode == 2 and record["error"].startswith("DATABASE_URL is malformed") and reason in record["error"], record
        assert "Secr3t" not in garbage.stderr


def test_labelled_counters_exist_at_zero_from_start_up(db_url: str) -> None:
    app = App()

    @app.handler("jobs")
    async def ok(job: Job[dict[str, Any]]) -> None:
        pass

    asyncio.run(pg_worker.install(db_url, ["jobs"]))
    metrics = instrument(pg_worker.Worker(app, db_url, pg_worker.WorkerConfig()))
    text = generate_latest(metrics.registry).decode()
    for line in (
        'pg_worker_db_errors_total{operation="read"} 0.0',
        'pg_worker_db_errors_total{operation="listen"} 0.0',
        'pg_worker_messages_rejected_total{queue="jobs",reason="invalid_payload"} 0.0',
        'pg_worker_messages_rejected_total{queue="jobs",reason="unknown_type"} 0.0',
        'pg_worker_job_failures_total{error_type="JobTimeout",queue="jobs"} 0.0',
        'pg_worker_jobs_total{outcome="dead_lettered",queue="jobs"} 0.0',
    ):
        assert line in text, line


# --- item 9: output ----------------------------------------------------------------------------------------------

def test_tables_are_not_cut_at_80_columns_when_piped(db_url: str) -> None:
    long_name = "a_queue_with_a_long_name_operators_grep_for"  # 43 characters, the longest allowed
    asyncio.run(pg_worker.install(db_url, [long_name]))
    for args in (("queues",), ("status", "--interval", "0.1")):
        shown = cli(db_url, *args)
        assert shown.returncode == 0, shown.stderr
        assert long_name in shown.stdout, shown.stdout


def test_errors_follow_the_log_format_on_stderr(db_url: str) -> None:
    asyncio.run(pg_worker.install(db_url, ["jobs"]))
    bad = cli(db_url, "send", "jobs", "{customer: 5}")
    assert bad.returncode == 2
    [record] = json_lines(bad.stderr)
    assert (record["event"], record["exit_code"]) == ("cli_error", 2) and "not valid JSON" in record["error"]
    failed = cli(db_url, "dlq", "show", "jobs", "42")
    assert json_lines(failed.stderr)[-1]["event"] == "cli_error"
    plain = cli(db_url, "send", "jobs", "{customer: 5}", PG_WORKER_LOG_FORMAT="console")
    assert plain.stderr.startswith("pg-worker: error: payload is not valid JSON")


def test_bootstrap_without_python_says_so_in_one_line() -> None:
    result = subprocess.run(
        [str(REPO / "scripts" / "bootstrap")], env={**os.environ, "PYTHON": "nopython"}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["bootstrap: Python 3.11 or newer is needed; PYTHON=nopython: not found"]


# --- item 2: embedded servers do not outlive the processes that started them ---------------------------------

@pytest.fixture(scope="module")
def embedded_dir(pg_tmp_root: Path) -> Iterator[Path]:
    """A data directory for CLI processes that start the embedded server themselves (no DATABASE_URL)."""
    path = pg_tmp_root / "embedded" / "data"
    path.parent.mkdir()
    install = _embedded_cli(path, "install", "--queue", "jobs")
    _, err = install.communicate(timeout=90)
    assert install.returncode == 0, err
    assert _postmaster(path) is None, "install stops the server it started"
    yield path
    postmaster = _postmaster(path)
    if postmaster is not None:  # a failed test must not leak it either
        postmaster.terminate()
        postmaster.wait(30)


def _postmaster(data_dir: Path) -> psutil.Process | None:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        process = psutil.Process(pid)
        return process if process.name() == "postgres" else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def _embedded_cli(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "COLUMNS")}
    return subprocess.Popen(
        [sys.executable, "-m", "pg_worker", *args],
        env={**env, "PG_WORKER_DATA_DIR": str(data_dir), "PG_WORKER_LOG_FORMAT": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _handles(data_dir: Path) -> list[int]:
    try:
        return [int(pid) for pid in json.loads((data_dir / ".handle_pids.json").read_text())]
    except (OSError, ValueError):
        return []


def _watching(data_dir: Path) -> tuple[subprocess.Popen[str], psutil.Process]:
    """``status --watch`` on the embedded server, once the server is up and the process holds a handle."""
    proc = _embedded_cli(data_dir, "status", "--watch", "--interval", "0.2")
    deadline = time.monotonic() + 60
    while proc.pid not in _handles(data_dir) or _postmaster(data_dir) is None:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the CLI did not start the embedded server within 60 s"
        time.sleep(0.05)
    postmaster = _postmaster(data_dir)
    assert postmaster is not None and postmaster.is_running()
    return proc, postmaster


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signalled_cli_stops_the_embedded_server_it_started(embedded_dir: Path, sig: signal.Signals) -> None:
    proc, postmaster = _watching(embedded_dir)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode in (0, 128 + sig), proc.returncode
    postmaster.wait(30)  # pg_ctl stop -w returned before the CLI exited; this only reaps the status
    assert not postmaster.is_running()
    assert _handles(embedded_dir) == []


def test_a_killed_cli_leaves_no_handle_that_keeps_the_server_alive(embedded_dir: Path) -> None:
    killed, postmaster = _watching(embedded_dir)
    killed.kill()  # no atexit hooks: its pid stays in the handle file
    killed.communicate(timeout=30)
    assert killed.pid in _handles(embedded_dir)
    after = _embedded_cli(embedded_dir, "queues", "--json")
    _, err = after.communicate(timeout=60)
    assert after.returncode == 0, err
    assert "embedded_postgres_stale_handles" in err
    postmaster.wait(30)
    assert not postmaster.is_running(), "the stale handle kept the server alive"
