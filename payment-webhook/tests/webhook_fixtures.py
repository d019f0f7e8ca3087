"""Fixtures of payment-webhook's tests (re-exported by conftest.py, so mypy can check this uniquely named module):
one embedded PostgreSQL 18 for the session, a migrated template database, a clone per test, and
the webhook app served by uvicorn on 127.0.0.1 (an ephemeral port) in a thread of the test process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from payment_webhook import WebhookSettings, migrate
from pg_worker import start_embedded
from webhook_helpers import MP_SECRETS, STANDARD_SECRETS, PgServer, RunningServer, serve

TEMPLATE = "pwh_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def webhook_pg() -> Iterator[PgServer]:
    # Not under pytest's basetemp: a concurrent pytest session of the same user prunes old basetemp directories,
    # which would delete a running server's data directory from under it.
    with tempfile.TemporaryDirectory(prefix="pwh-pg-") as tmp:
        Path(tmp).chmod(0o755)
        server = PgServer(start_embedded(Path(tmp) / "data", cleanup="delete"))
        try:
            yield from _prepared(server)
        finally:
            # The handle stops only the postmaster it started: after a test's stop/start it would leave the new
            # one running on a deleted directory. pg_ctl stops whichever postmaster owns the data directory.
            with contextlib.suppress(subprocess.CalledProcessError):
                server.stop()
            server.handle.cleanup()


def _prepared(server: PgServer) -> Iterator[PgServer]:
    with server.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    asyncio.run(migrate(server.url(TEMPLATE)))
    yield server


@pytest.fixture
def webhook_db(webhook_pg: PgServer) -> Iterator[str]:
    """A migrated database of its own (schema webhook, pgmq, queues device_actions and payment_sync)."""
    name = f"pwh_{os.getpid()}_{next(_counter)}"
    with webhook_pg.admin() as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield webhook_pg.url(name)
    with webhook_pg.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def blank_db(webhook_pg: PgServer) -> Iterator[str]:
    name = f"pwhb_{os.getpid()}_{next(_counter)}"
    with webhook_pg.admin() as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    yield webhook_pg.url(name)
    with webhook_pg.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def make_settings(**overrides: object) -> WebhookSettings:
    values: dict[str, object] = {
        "standard_secrets": " ".join(STANDARD_SECRETS),
        "mercadopago_secrets": ",".join(MP_SECRETS),
        "db_timeout_seconds": 2.0,
        "pool_max_size": 10,
    }
    values.update(overrides)
    return WebhookSettings.model_validate(values)


@pytest.fixture
def webhook_server(webhook_db: str) -> Iterator[RunningServer]:
    with serve(make_settings(), webhook_db) as running:
        yield running


@pytest.fixture
def db(webhook_db: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(webhook_db, autocommit=True) as conn:
        yield conn
