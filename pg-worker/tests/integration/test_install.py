from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import pytest

import pg_worker
from conftest import PgServer
from pg_worker import SetupError


def _scalar(url: str, query: str) -> object:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return row[0]


async def test_fresh_database_gets_pgmq_from_the_shipped_sql_then_a_second_run_changes_nothing(empty_db_url: str) -> None:
    first = await pg_worker.install(empty_db_url, ["activations"])
    assert first.pgmq_source == "sql"
    assert first.pgmq_version == "1.13.0"
    assert sorted(first.created_queues) == ["activations", "activations_dlq"]
    assert first.created_triggers == ["activations"]

    second = await pg_worker.install(empty_db_url, ["activations"])
    assert not second.changed
    assert second.pgmq_source == "present"
    assert _scalar(empty_db_url, "SELECT count(*) FROM pgmq.meta") == 2
    # the wakeup trigger sits on the queue, not on its dead-letter queue
    assert _scalar(empty_db_url, "SELECT count(*) FROM pg_trigger WHERE tgname = 'pg_worker_wakeup'") == 1


def test_two_installs_at_once_from_two_processes_both_succeed(empty_db_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": empty_db_url, "PG_WORKER_LOG_FORMAT": "json"}
    command = [sys.executable, "-m", "pg_worker", "install", "--queue", "alpha", "--queue", "beta"]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    outputs = sorted(out for out, _ in results)
    # exactly one of them created the queues; the other found them in place
    assert "queues created: none" in outputs[0] or "queues created: none" in outputs[1]
    assert _scalar(empty_db_url, "SELECT count(*) FROM pgmq.meta") == 4


async def test_refuses_a_pgmq_older_than_1_10(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        # the shape of pgmq < 1.10: message_record without last_read_at
        conn.execute("CREATE SCHEMA pgmq")
        conn.execute(
            "CREATE TYPE pgmq.message_record AS (msg_id bigint, read_ct integer, enqueued_at timestamptz, "
            "vt timestamptz, message jsonb)"
        )
    with pytest.raises(SetupError, match=r"older than 1\.10"):
        await pg_worker.install(empty_db_url, ["jobs"])


def test_version_check_rejects_old_extension_versions() -> None:
    from pg_worker._install import _require_recent

    _require_recent("1.10.0", "test")
    _require_recent("1.13.0", "test")
    with pytest.raises(SetupError, match=r"pgmq 1\.9\.2 .* too old"):
        _require_recent("1.9.2", "test")


async def test_worker_recreates_a_dropped_wakeup_trigger_at_start_up(db_url: str) -> None:
    await pg_worker.install(db_url, ["jobs"])
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER pg_worker_wakeup ON pgmq.q_jobs")
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        problems = await pg_worker.check_setup(conn, ["jobs"])
    assert problems == ["wakeup trigger on queue 'jobs' is missing or disabled"]

    app = pg_worker.App()
    app.add_handler("jobs", lambda job: None)
    await asyncio.wait_for(pg_worker.run_worker(app, db_url, stop_when_idle=True), 30)
    assert _scalar(db_url, "SELECT count(*) FROM pg_trigger WHERE tgname = 'pg_worker_wakeup'") == 1


async def test_worker_without_auto_install_refuses_to_start_on_missing_queues(db_url: str) -> None:
    app = pg_worker.App()
    app.add_handler("nowhere", lambda job: None)
    with pytest.raises(SetupError, match=r"queue 'nowhere' does not exist.*pg-worker install"):
        await pg_worker.run_worker(app, db_url, pg_worker.WorkerConfig(auto_install=False))


def _offer_pgmq_extension(pg_server: PgServer, url: str, version: str) -> None:
    """Make this database see a real pgmq extension (PostgreSQL 18's extension_control_path), as the
    ghcr.io/pgmq/pg18-pgmq image offers one; its script is the SQL the pgmq package ships."""
    import pgmq

    root = Path(pg_server.handle.pgdata).parent / f"ext-{version}"
    (root / "extension").mkdir(parents=True, exist_ok=True)
    (root / "extension" / f"pgmq--{version}.sql").write_text(pgmq.get_embedded_install_sql())
    (root / "extension" / "pgmq.control").write_text(
        f"comment = 'pgmq for tests'\ndefault_version = '{version}'\nrelocatable = false\nschema = pgmq\n"
    )
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    dbname = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with pg_server.admin() as conn:
        conn.execute(f"ALTER DATABASE {dbname} SET extension_control_path = '$system:{root}'")


async def test_uses_create_extension_where_the_server_offers_pgmq(pg_server: PgServer, empty_db_url: str) -> None:
    _offer_pgmq_extension(pg_server, empty_db_url, "1.13.0")
    first = await pg_worker.install(empty_db_url, ["jobs"])
    assert (first.pgmq_source, first.pgmq_version) == ("extension", "1.13.0")
    assert _scalar(empty_db_url, "SELECT extversion FROM pg_extension WHERE extname = 'pgmq'") == "1.13.0"
    second = await pg_worker.install(empty_db_url, ["jobs"])
    assert not second.changed


async def test_refuses_an_offered_pgmq_extension_older_than_1_10(pg_server: PgServer, empty_db_url: str) -> None:
    _offer_pgmq_extension(pg_server, empty_db_url, "1.9.0")
    with pytest.raises(SetupError, match=r"pgmq 1\.9\.0 \(extension offered by this server\) is too old"):
        await pg_worker.install(empty_db_url, ["jobs"])
    assert _scalar(empty_db_url, "SELECT count(*) FROM pg_extension WHERE extname = 'pgmq'") == 0


async def test_install_never_downgrades_a_newer_schema_and_a_worker_says_so_at_start_up(db_url: str) -> None:
    from pg_worker import App, Worker, WorkerConfig

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE pgworker.meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SetupError, match="schema version 99, newer than"):
        await pg_worker.install(db_url, ["jobs"])
    assert _scalar(db_url, "SELECT value FROM pgworker.meta WHERE key = 'schema_version'") == "99", "left as it was"
    app = App()
    app.add_handler("jobs", lambda job: None)
    with pytest.raises(SetupError, match="upgrade this one"):
        await asyncio.wait_for(Worker(app, db_url, WorkerConfig(worker_id="old")).run(stop_when_idle=True), timeout=10)


async def test_an_older_schema_is_upgraded_in_place_by_install(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE pgworker.meta SET value = '1' WHERE key = 'schema_version'")
    report = await pg_worker.install(db_url, [])
    assert report.schema_created
    assert _scalar(db_url, "SELECT value FROM pgworker.meta WHERE key = 'schema_version'") == "2"


async def test_install_gives_up_clearly_instead_of_queueing_behind_a_long_transaction(db_url: str) -> None:
    await pg_worker.install(db_url, ["jobs"])
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER pg_worker_wakeup ON pgmq.q_jobs")
    with psycopg.connect(db_url) as producer:
        producer.execute("SELECT pgmq.send('jobs', '{}')")  # a transaction that wrote to the queue, still open
        with pytest.raises(psycopg.errors.LockNotAvailable):
            await asyncio.wait_for(pg_worker.install(db_url, ["jobs"], lock_timeout=0.5), timeout=10)
        producer.rollback()
    assert (await pg_worker.install(db_url, ["jobs"])).created_triggers == ["jobs"]


async def test_two_workers_with_one_worker_id_the_second_is_refused(db_url: str) -> None:
    from helpers import running_worker
    from pg_worker import App, Worker, WorkerConfig

    app = App()
    app.add_handler("jobs", lambda job: None)
    await pg_worker.install(db_url, ["jobs"])
    async with running_worker(app, db_url, worker_id="replica"):
        second = Worker(app, db_url, WorkerConfig(worker_id="replica"))
        with pytest.raises(SetupError, match="worker id 'replica' is in use"):
            await asyncio.wait_for(second.run(), timeout=15)


async def test_a_worker_role_that_owns_nothing_works_with_the_grants_install_gives_it(db_url: str) -> None:
    from psycopg.conninfo import make_conninfo

    from helpers import running_worker, wait_until
    from pg_worker import App, Job, PermanentFailure, Producer, RetryPolicy

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS pgw_runner")
        conn.execute("CREATE ROLE pgw_runner LOGIN")
    try:
        await pg_worker.install(db_url, ["jobs"], grant_to=["pgw_runner"])
        as_runner = make_conninfo(db_url, user="pgw_runner")
        app = App()
        app.queue("jobs", retry=RetryPolicy(max_attempts=2, base_delay=0.01, jitter=0))
        done: list[int] = []

        @app.handler("jobs")
        async def handle(job: Job[dict[str, Any]]) -> None:
            if job.payload.get("fail") and job.attempt == 1:
                raise TimeoutError("once")
            if job.payload.get("doomed"):
                raise PermanentFailure("no such customer")
            done.append(job.msg_id)

        with Producer(as_runner) as producer:
            ok = producer.enqueue("jobs", {})
            retried = producer.enqueue("jobs", {"fail": True})
            producer.enqueue("jobs", {"doomed": True})
        async with running_worker(app, as_runner, worker_id="runner"):
            await wait_until(lambda: sorted(done) == [ok, retried], what="both jobs, one after a retry")
            await wait_until(lambda: _dlq_size(db_url), what="the dead letter")
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("DROP OWNED BY pgw_runner")
            conn.execute("DROP ROLE pgw_runner")


async def _dlq_size(url: str) -> int:
    from helpers import dlq_messages

    return len(await dlq_messages(url, "jobs"))
