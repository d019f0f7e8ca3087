"""``wl-console migrate``: the ``console`` schema (versioned, forward-only) and the console's search indexes.

The runner is pg-worker's (:mod:`pg_worker.migrations`, as for wl-workers: one transaction behind one advisory
lock; an applied migration whose file changed is refused). The indexes the console's searches need on
wl-workers' tables are not versioned migrations of ours (wl owns those tables and their migrations): they are
ensured on every run with ``CREATE INDEX IF NOT EXISTS``, only for the tables that exist, so running
``wl-console migrate`` before or after ``wl-workers migrate`` both end with the indexes once both have run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg.errors

from pg_worker.migrations import MigrationError, Migrations

from . import _sql

__all__ = ["MigrationError", "MigrationReport", "migrate"]

logger = logging.getLogger(__name__)

CONSOLE_MIGRATIONS = Migrations(package="wl_console.migrations", schema="console", lock_key=_sql.LOCK_MIGRATE, label="console")


@dataclass
class MigrationReport:
    applied: list[str] = field(default_factory=list)
    current: int = 0
    indexes: list[str] = field(default_factory=list)
    indexes_skipped: list[str] = field(default_factory=list)


async def migrate(conninfo: str) -> MigrationReport:
    """Apply the pending migrations and ensure the search indexes; concurrent callers wait on the lock."""
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        applied = await CONSOLE_MIGRATIONS.apply(conn)
        report = MigrationReport(applied.applied, applied.current)
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
