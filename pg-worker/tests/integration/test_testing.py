"""pg_worker.testing, the helpers the services' test suites share: template databases, clones, waiting."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from conftest import TEMPLATE
from pg_worker.testing import PgServer, clone_fixture, database_name, template_database, wait_until, wait_until_sync

cloned = clone_fixture("pg_server", TEMPLATE, prefix="cf")


def _tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1").fetchall()
    return [row[0] for row in rows]


def test_a_template_is_set_up_once_and_each_clone_starts_from_it_alone(pg_server: PgServer) -> None:
    async def migrate(url: str) -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("CREATE TABLE customers (id int)")

    name = template_database(pg_server, "tt_template", migrate)
    assert name == "tt_template" and _tables(pg_server.url(name)) == ["customers"]
    with pg_server.clone(name, prefix="tt") as first, pg_server.clone(name, prefix="tt") as second:
        assert first != second and database_name(first).startswith("tt_")
        with psycopg.connect(first, autocommit=True) as conn:
            conn.execute("CREATE TABLE only_in_first (id int)")
        assert _tables(first) == ["customers", "only_in_first"] and _tables(second) == ["customers"]
    with pg_server.admin() as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname IN (%s, %s)", (database_name(first), database_name(second))).fetchone()
        assert left == (0,), "clones are dropped on exit"
    # a sync setup, and again: the template is re-created, not added to
    def sync_setup(url: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE other (id int)")

    pg_server.template_database("tt_template", sync_setup)
    assert _tables(pg_server.url("tt_template")) == ["other"]
    with pg_server.admin() as conn:
        conn.execute("DROP DATABASE tt_template")


def test_clone_fixture_gives_each_test_a_database_of_the_template(cloned: str) -> None:
    assert database_name(cloned).startswith("cf_")
    with psycopg.connect(cloned) as conn:
        assert conn.execute("SELECT to_regnamespace('pgmq') IS NOT NULL").fetchone() == (True,)


async def test_wait_until_awaits_async_predicates_and_names_what_it_waited_for() -> None:
    ready_at = time.monotonic() + 0.2

    async def ready() -> bool:
        return time.monotonic() >= ready_at

    await wait_until(ready, timeout=5)
    with pytest.raises(AssertionError, match=r"timed out after 0.1s waiting for the router"):
        await wait_until(lambda: False, timeout=0.1, what="the router")
    await asyncio.sleep(0)


def test_wait_until_sync() -> None:
    ready_at = time.monotonic() + 0.2
    wait_until_sync(lambda: time.monotonic() >= ready_at, timeout=5)
    with pytest.raises(AssertionError, match=r"timed out after 0.1s waiting for the banner"):
        wait_until_sync(lambda: False, timeout=0.1, what="the banner")
