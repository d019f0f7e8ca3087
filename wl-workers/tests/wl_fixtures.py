"""Fixtures of wl-workers' tests (re-exported by conftest.py): one embedded PostgreSQL 18 per session with a
migrated template database (a clone per test), and a RouterOS simulator on 127.0.0.1 per test."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pg_worker
from pg_worker import start_embedded
from wl_workers._migrate import migrate
from wl_workers.settings import QUEUES
from wl_workers.simulator import RouterSimulator

TEMPLATE = "wl_template"
ROUTER_PASSWORD_ENV = "WL_TEST_ROUTER_PASSWORD"
ROUTER_PASSWORD = "s3cret-router-pw"
_counter = itertools.count()

# Until branch r3-wl's migrations 0003 (wl.device_tests) and 0004 (wl.service_history, the contract's DDL) are
# merged, the operator commands' tests create those tables here, then apply migration 0005 (kept in
# migrations/pending/ meanwhile, because the runner refuses a gap in the versions). At the merge: move 0005 into
# migrations/ and delete this block.
PENDING_SCHEMA = """
CREATE TABLE IF NOT EXISTS wl.service_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    service_id  text NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind        text NOT NULL,
    source      text,
    actor       text,
    reason      text,
    event_id    text,
    payment_id  text,
    state       text,
    outcome     text,
    error_class text,
    duration_ms double precision,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS service_history_service_at_idx ON wl.service_history (service_id, at DESC);
CREATE TABLE IF NOT EXISTS wl.device_tests (
    request_id text PRIMARY KEY, device text NOT NULL, at timestamptz NOT NULL DEFAULT now(), ok boolean NOT NULL, message text
);
""" + (Path(__file__).parent.parent / "src" / "wl_workers" / "migrations" / "pending" / "0005_operator_checks.sql").read_text()


class WlPg:
    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def url(self, database: str = "postgres") -> str:
        return str(self.handle.get_uri(database=database))

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url(), autocommit=True)


@pytest.fixture(scope="session")
def wl_pg() -> Iterator[WlPg]:
    # a directory of our own, not pytest's numbered tmp dirs, which concurrent pytest runs of other checkouts on
    # the same machine prune (an initdb failed that way)
    base = Path(tempfile.mkdtemp(prefix="wl-workers-pg-"))
    server = WlPg(start_embedded(base / "data", cleanup="delete"))
    with server.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        conn.execute(f"CREATE DATABASE {TEMPLATE}")

    async def prepare() -> None:
        await migrate(server.url(TEMPLATE))
        await pg_worker.install(server.url(TEMPLATE), QUEUES)
        async with await psycopg.AsyncConnection.connect(server.url(TEMPLATE), autocommit=True) as conn:
            await conn.execute(PENDING_SCHEMA.encode())

    asyncio.run(prepare())
    yield server
    server.handle.cleanup()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def wl_db(wl_pg: WlPg) -> Iterator[str]:
    """A migrated database with the queues, cloned from the template."""
    name = f"wl_{os.getpid()}_{next(_counter)}"
    with wl_pg.admin() as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield wl_pg.url(name)
    with wl_pg.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def wl_empty_db(wl_pg: WlPg) -> Iterator[str]:
    name = f"wle_{os.getpid()}_{next(_counter)}"
    with wl_pg.admin() as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    yield wl_pg.url(name)
    with wl_pg.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def router_password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ROUTER_PASSWORD_ENV, ROUTER_PASSWORD)
    return ROUTER_PASSWORD


@pytest.fixture
def sim(router_password: str) -> Iterator[RouterSimulator]:
    with RouterSimulator(username="api", password=router_password, api=True) as router:
        yield router
