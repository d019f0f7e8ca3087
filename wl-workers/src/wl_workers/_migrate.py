"""Forward-only schema migrations for schema ``wl``, safe when several processes run them at once.

Why a small runner instead of a migration tool: the migrations are plain SQL, owned by one package, applied to a
database other packages also migrate (pgmq, pg-worker, payment-webhook). The maintained tools either bring an
ORM (alembic: SQLAlchemy), a second driver (yoyo: psycopg2 by default), or a binary (sqitch, dbmate, flyway), and
none of them takes a PostgreSQL advisory lock shared with our own start-up. This runner is one transaction
behind one advisory lock: a second ``wl-workers migrate`` waits, then finds nothing to do. A migration file that
was edited after it was applied is refused (its checksum differs), so history cannot drift silently.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from importlib import resources

import psycopg

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


def load_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("wl_workers.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must be 1..n without gaps, found {versions}")
    return found


async def migrate(conninfo: str, migrations: list[Migration] | None = None) -> MigrationReport:
    """Apply the pending migrations in one transaction; concurrent callers wait on the advisory lock."""
    todo = load_migrations() if migrations is None else migrations
    report = MigrationReport()
    async with await psycopg.AsyncConnection.connect(conninfo) as conn, conn.transaction():
        await conn.execute(_sql.MIGRATION_LOCK)
        await conn.execute(_sql.MIGRATION_TABLE)
        cur = await conn.execute(_sql.APPLIED_MIGRATIONS)
        applied = {int(row[0]): (str(row[1]), str(row[2])) for row in await cur.fetchall()}
        known = {m.version for m in todo}
        unknown = sorted(set(applied) - known)
        if unknown:
            raise MigrationError(f"the database has migrations this package does not know: {unknown} (a newer version ran?)")
        for m in todo:
            if m.version in applied:
                name, checksum = applied[m.version]
                if checksum != m.checksum:
                    raise MigrationError(f"migration {m.name} changed after it was applied (checksum differs from {name})")
                continue
            await conn.execute(m.sql.encode())
            await conn.execute(_sql.RECORD_MIGRATION, (m.version, m.name, m.checksum))
            report.applied.append(m.name)
            logger.info("migration_applied", extra={"event": "migration_applied", "migration": m.name})
        report.current = max(known, default=0)
    return report


async def pending_migrations(conninfo: str) -> list[str]:
    """The migrations this package has that the database lacks (read-only; all of them before the first run)."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        cur = await conn.execute(_sql.MIGRATIONS_TABLE_EXISTS)
        row = await cur.fetchone()
        applied: set[int] = set()
        if row is not None and row[0]:
            cur = await conn.execute(_sql.APPLIED_MIGRATIONS)
            applied = {int(r[0]) for r in await cur.fetchall()}
    return [m.name for m in load_migrations() if m.version not in applied]
