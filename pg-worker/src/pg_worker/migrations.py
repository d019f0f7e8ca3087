"""Versioned, forward-only SQL migrations for the services built on pg-worker, safe when several processes run
them at once.

A service keeps its migrations as ``NNNN_name.sql`` files in a package of its own and records them in
``<schema>.schema_migrations``. Why a small runner instead of a migration tool: the migrations are plain SQL,
applied to a database that other packages migrate too (pgmq, pg-worker, the other services). The maintained tools
either bring an ORM (alembic: SQLAlchemy), a second driver (yoyo: psycopg2 by default), or a binary (sqitch,
dbmate, flyway), and none of them takes a PostgreSQL advisory lock. This runner is one transaction behind one
advisory lock: a second ``migrate`` waits, then finds nothing to do. A migration file that was edited after it
was applied is refused (its checksum differs), so history cannot drift silently.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """The database's migration history does not match this package's migrations."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass
class MigrationReport:
    applied: list[str] = field(default_factory=list)
    current: int = 0


@dataclass(frozen=True)
class Migrations:
    """The migrations of one service: ``package`` holds the files, ``schema`` the history table, ``lock_key``
    (the first key of a two-int advisory lock, distinct per service) serializes concurrent runs; ``label`` names
    the service in errors and in the log event (``<label>_migration_applied``)."""

    package: str
    schema: str
    lock_key: int
    label: str | None = None

    def load(self) -> list[Migration]:
        found = []
        for entry in resources.files(self.package).iterdir():
            match = _NAME.match(entry.name)
            if match:
                found.append(Migration(int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
        found.sort(key=lambda m: m.version)
        versions = [m.version for m in found]
        if versions != list(range(1, len(found) + 1)):
            raise MigrationError(f"migration versions must be 1..n without gaps, found {versions}")
        return found

    async def migrate(self, conninfo: str, migrations: list[Migration] | None = None) -> MigrationReport:
        """Apply the pending migrations in one transaction; concurrent callers wait on the advisory lock."""
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            return await self.apply(conn, migrations)

    async def apply(self, conn: psycopg.AsyncConnection[Any], migrations: list[Migration] | None = None) -> MigrationReport:
        """:meth:`migrate` on a connection of the caller's (which may go on using it afterwards)."""
        todo = self.load() if migrations is None else migrations
        report = MigrationReport()
        table = sql.Identifier(self.schema, "schema_migrations")
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (self.lock_key,))
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(table)
            )
            cur = await conn.execute(sql.SQL("SELECT version, name, checksum FROM {} ORDER BY version").format(table))
            applied = {int(row[0]): (str(row[1]), str(row[2])) for row in await cur.fetchall()}
            known = {m.version for m in todo}
            unknown = sorted(set(applied) - known)
            what = f"{self.label} migrations" if self.label else "migrations"
            if unknown:
                raise MigrationError(f"the database has {what} this package does not know: {unknown} (a newer version ran?)")
            event = f"{self.label}_migration_applied" if self.label else "migration_applied"
            for m in todo:
                if m.version in applied:
                    name, checksum = applied[m.version]
                    if checksum != m.checksum:
                        raise MigrationError(f"migration {m.name} changed after it was applied (checksum differs from {name})")
                    continue
                await conn.execute(m.sql.encode())
                await conn.execute(sql.SQL("INSERT INTO {} (version, name, checksum) VALUES (%s, %s, %s)").format(table), (m.version, m.name, m.checksum))
                report.applied.append(m.name)
                logger.info(event, extra={"event": event, "migration": m.name})
            report.current = max(known, default=0)
        return report

    async def pending(self, conninfo: str) -> list[str]:
        """The migrations this package has that the database lacks (read-only; all of them before the first run)."""
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            table = sql.Identifier(self.schema, "schema_migrations")
            cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{self.schema}.schema_migrations",))
            row = await cur.fetchone()
            applied: set[int] = set()
            if row is not None and row[0]:
                cur = await conn.execute(sql.SQL("SELECT version FROM {}").format(table))
                applied = {int(r[0]) for r in await cur.fetchall()}
        return [m.name for m in self.load() if m.version not in applied]
