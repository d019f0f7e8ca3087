"""What every benchmark needs: a PostgreSQL, fresh databases, statistics and a result table."""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pg_worker
from pg_worker._database import start_embedded

_counter = itertools.count()


@dataclass
class Server:
    """The PostgreSQL under test: ``DATABASE_URL``'s server, or an embedded one in a temporary directory."""

    admin_url: str
    handle: Any = None

    def url(self, dbname: str) -> str:
        return make_conninfo(self.admin_url, dbname=dbname)

    @contextmanager
    def database(self, queues: list[str], *, install: bool = True) -> Iterator[str]:
        name = f"bench_{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        url = self.url(name)
        try:
            if install:
                import asyncio

                asyncio.run(pg_worker.install(url, queues))
            yield url
        finally:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def commits(self, dbname: str) -> int:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (dbname,)
            ).fetchone()
            assert row is not None
            return int(row[0])


@contextmanager
def server() -> Iterator[Server]:
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        yield Server(url)
        return
    with tempfile.TemporaryDirectory(prefix="pgw-bench-") as tmp:
        Path(tmp).chmod(0o755)
        handle = start_embedded(Path(tmp) / "data", cleanup="delete")
        try:
            with psycopg.connect(str(handle.get_uri()), autocommit=True) as conn:
                # Autovacuum workers open transactions in every database now and then: noise for the idle count.
                conn.execute("ALTER SYSTEM SET autovacuum = off")
                conn.execute("SELECT pg_reload_conf()")
            yield Server(str(handle.get_uri()), handle)
        finally:
            handle.cleanup()


def dbname_of(url: str) -> str:
    return str(conninfo_to_dict(url)["dbname"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Row:
    """One line of the result table: our figure next to its same-run baseline."""

    benchmark: str
    measure: str
    unit: str
    ours: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    baseline_name: str = ""
    target: str = ""
    higher_is_better: bool = True

    @property
    def ours_median(self) -> float:
        return statistics.median(self.ours) if self.ours else float("nan")

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline) if self.baseline else float("nan")

    @property
    def ratio(self) -> float | None:
        if not self.baseline or self.baseline_median == 0:
            return None
        return self.ours_median / self.baseline_median
