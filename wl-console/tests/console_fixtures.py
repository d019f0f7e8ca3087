"""Fixtures of wl-console's tests: one embedded PostgreSQL 18 per session with a template database migrated by
every package (wl-workers, pg-worker's queues, payment-webhook, wl-console) a clone per test, and the console app in process with a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

import pg_worker
from console_helpers import Harness, console_settings
from payment_webhook._migrate import migrate as webhook_migrate
from pg_worker.testing import PgServer
from wl_console import create_app
from wl_console import migrate as console_migrate
from wl_workers._migrate import migrate as wl_migrate
from wl_workers.settings import QUEUES

TEMPLATE = "console_template"


async def prepare_database(url: str) -> None:
    """Everything a deployment's migrate steps create, in their order, plus the round-3 contract schema."""
    await wl_migrate(url)
    await pg_worker.install(url, QUEUES)
    await webhook_migrate(url)
    await console_migrate(url)


@pytest.fixture(scope="session", autouse=True)
def cheap_argon2() -> Iterator[None]:
    """argon2 at its RFC cost takes ~0.1-0.5 s per hash here: tests that log in dozens of times use cheap
    parameters (the code path is the same; a test of accounts.py checks the production defaults)."""
    from argon2 import PasswordHasher

    from wl_console import accounts

    default = accounts._hasher
    accounts.use_hasher(PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    yield
    accounts.use_hasher(default)


@pytest.fixture(scope="session")
def console_pg() -> Iterator[PgServer]:
    with PgServer.running() as server:
        server.template_database(TEMPLATE, prepare_database)
        yield server


@pytest.fixture
def console_db(console_pg: PgServer) -> Iterator[str]:
    with console_pg.clone(TEMPLATE, prefix="console") as url:
        yield url


@pytest.fixture
async def console(console_db: str) -> AsyncIterator[Harness]:
    harness = Harness(console_db)
    app = create_app(console_settings(), conninfo=console_db, clock=harness.clock)
    harness.app = app
    async with app.router.lifespan_context(app):
        yield harness
    await harness.aclose()
