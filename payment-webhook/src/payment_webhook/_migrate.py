"""``payment-webhook migrate``: the ``webhook`` schema (versioned, forward-only) and the queues it sends to."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import psycopg

import pg_worker

from . import _sql

logger = logging.getLogger(__name__)

# The queues this service sends to; `migrate` makes sure they exist (pgmq, pg-worker's triggers, their DLQs).
QUEUES = ("device_actions", "payment_sync")


@dataclass
class MigrationReport:
    applied: list[int] = field(default_factory=list)
    current: int = 0
    install: pg_worker.InstallReport | None = None


async def migrate(conninfo: str) -> MigrationReport:
    """Bring the database up to date; idempotent and safe when several processes run it at once."""
    report = MigrationReport()
    # pgmq and the queues first (pg-worker's install has its own lock and transaction).
    report.install = await pg_worker.install(conninfo, list(QUEUES))
    async with await psycopg.AsyncConnection.connect(conninfo) as conn, conn.transaction():
        await conn.execute(_sql.LOCK, (_sql.MIGRATION_LOCK_KEY,))
        await conn.execute(_sql.CREATE_SCHEMA)
        await conn.execute(_sql.CREATE_MIGRATIONS_TABLE)
        cur = await conn.execute(_sql.APPLIED_VERSIONS)
        applied = {int(row[0]) for row in await cur.fetchall()}
        known = {version for version, _, _ in _sql.MIGRATIONS}
        unknown = applied - known
        if unknown:
            # A newer release migrated this database: running older code against it is not safe.
            raise RuntimeError(f"database has webhook migrations this version does not know: {sorted(unknown)}")
        for version, name, statement in _sql.MIGRATIONS:
            if version in applied:
                continue
            await conn.execute(statement.encode())
            await conn.execute(_sql.RECORD_MIGRATION, (version, name))
            report.applied.append(version)
            logger.info("webhook_migration_applied", extra={"event": "webhook_migration_applied", "version": version, "migration": name})
        report.current = max(known | applied, default=0)
    return report
