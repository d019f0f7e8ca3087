"""Fixtures of wl-workers' tests (re-exported by conftest.py): one embedded PostgreSQL 18 per session with a
migrated template database (a clone per test), and a RouterOS simulator on 127.0.0.1 per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import pg_worker
from pg_worker.testing import PgServer
from wl_workers._migrate import migrate
from wl_workers.cli import main
from wl_workers.settings import QUEUES
from wl_workers.simulator import RouterSimulator

TEMPLATE = "wl_template"
ROUTER_PASSWORD_ENV = "WL_TEST_ROUTER_PASSWORD"
ROUTER_PASSWORD = "s3cret-router-pw"


@pytest.fixture(scope="session")
def wl_pg() -> Iterator[PgServer]:
    async def prepare(url: str) -> None:
        await migrate(url)
        await pg_worker.install(url, QUEUES)

    with PgServer.running() as server:
        server.template_database(TEMPLATE, prepare)
        yield server


@pytest.fixture
def wl_db(wl_pg: PgServer) -> Iterator[str]:
    """A migrated database with the queues, cloned from the template."""
    with wl_pg.clone(TEMPLATE, prefix="wl") as url:
        yield url


@pytest.fixture
def wl_empty_db(wl_pg: PgServer) -> Iterator[str]:
    with wl_pg.clone("template0", prefix="wle") as url:
        yield url


@pytest.fixture
def router_password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ROUTER_PASSWORD_ENV, ROUTER_PASSWORD)
    return ROUTER_PASSWORD


@pytest.fixture
def sim(router_password: str) -> Iterator[RouterSimulator]:
    with RouterSimulator(username="api", password=router_password, api=True) as router:
        yield router


Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """``wl-workers ARGV...`` in-process against a database: (exit code, stdout, stderr)."""

    def run(url: str, *argv: str) -> tuple[int, str, str]:
        monkeypatch.setenv("DATABASE_URL", url)
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run
