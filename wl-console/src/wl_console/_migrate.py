"""``wl-console migrate``: the ``console`` schema (versioned, forward-only) and the console's search indexes.

The runner is the one wl-workers uses (one transaction behind one advisory lock; an applied migration whose
file changed is refused). The indexes the console's searches need on wl-workers' tables are not versioned
migrations of ours (wl owns those tables and their migrations): they are ensured on every run with
``CREATE INDEX IF NOT EXISTS``, only for the tables that exist, so running ``wl-console migrate`` before or after
``wl-workers migrate`` both end with the indexes once both have run.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import psycopg
import psycopg.errors

from . import _sql

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
    indexes: list[str] = field(default_factory=list)
    indexes_skipped: list[str] = field(default_factory=list)


def load_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("wl_console.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must be 1..n without gaps, found {versions}")
    return found


async def migrate(conninfo: str) -> MigrationReport:
    """Apply the pending migrations and ensure the search indexes; concurrent callers wait on the lock."""
    todo = load_migrations()
    report = MigrationReport()
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        async with conn.transaction():
            await conn.execute(_sql.MIGRATION_LOCK)
            await conn.execute(_sql.MIGRATION_TABLE)
            cur = await conn.execute(_sql.APPLIED_MIGRATIONS)
            applied = {int(row[0]): (str(row[1]), str(row[2])) for row in await cur.fetchall()}
            unknown = sorted(set(applied) - {m.version for m in todo})
            if unknown:
                raise MigrationError(f"the database has console migrations this package does not know: {unknown} (a newer version ran?)")
            for m in todo:
                if m.version in applied:
                    if applied[m.version][1] != m.checksum:
                        raise MigrationError(f"migration {m.name} changed after it was applied (checksum differs)")
                    continue
                await conn.execute(m.sql.encode())
                await conn.execute(_sql.RECORD_MIGRATION, (m.version, m.name, m.checksum))
                report.applied.append(m.name)
                logger.info("console_migration_applied", extra={"event": "console_migration_applied", "migration": m.name})
            report.current = max((m.version for m in todo), default=0)
        await _ensure_indexes(conn, report)
    return report


async def _ensure_indexes(conn: psycopg.AsyncConnection[Any], report: MigrationReport) -> None:
    for name, table, statement in _sql.SEARCH_INDEXES:
        cur = await conn.execute(_sql.TABLE_EXISTS, (table,))
        row = await cur.fetchone()
        if row is None or not row[0]:
            report.indexes_skipped.append(f"{name} ({table} does not exist yet: run wl-console migrate again after its owner's migrate)")
            continue
        try:
            async with conn.transaction():
                await conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            # The tables belong to their package's migration role: without ownership the search still works, slower.
            logger.warning("console_index_not_created", extra={"event": "console_index_not_created", "index": name, "table": table, "error": "not the table's owner"})
            report.indexes_skipped.append(f"{name} (not the owner of {table})")
            continue
        except psycopg.errors.UndefinedColumn as exc:
            # The owner's migration that adds the column has not run yet (an older version of that package).
            logger.warning("console_index_not_created", extra={"event": "console_index_not_created", "index": name, "table": table, "error": str(exc).strip()})
            report.indexes_skipped.append(f"{name} ({table} lacks the column yet: run wl-console migrate again after its owner's migrate)")
            continue
        report.indexes.append(name)


async def pending_migrations(conninfo: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        cur = await conn.execute(_sql.MIGRATIONS_TABLE_EXISTS)
        row = await cur.fetchone()
        applied: set[int] = set()
        if row is not None and row[0]:
            cur = await conn.execute(_sql.APPLIED_MIGRATIONS)
            applied = {int(r[0]) for r in await cur.fetchall()}
    return [m.name for m in load_migrations() if m.version not in applied]
