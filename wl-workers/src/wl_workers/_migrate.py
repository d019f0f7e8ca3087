"""Forward-only schema migrations for schema ``wl`` (``wl_workers/migrations/NNNN_name.sql``), run by
pg-worker's migration runner (:mod:`pg_worker.migrations`: one transaction behind one advisory lock; an
applied migration whose file changed is refused)."""

from __future__ import annotations

from pg_worker.migrations import Migration, MigrationError, MigrationReport, Migrations

from . import _sql

__all__ = ["Migration", "MigrationError", "MigrationReport", "load_migrations", "migrate", "pending_migrations"]

WL_MIGRATIONS = Migrations(package="wl_workers.migrations", schema="wl", lock_key=_sql.LOCK_MIGRATE)


def load_migrations() -> list[Migration]:
    return WL_MIGRATIONS.load()


async def migrate(conninfo: str, migrations: list[Migration] | None = None) -> MigrationReport:
    """Apply the pending migrations in one transaction; concurrent callers wait on the advisory lock."""
    return await WL_MIGRATIONS.migrate(conninfo, migrations)


async def pending_migrations(conninfo: str) -> list[str]:
    """The migrations this package has that the database lacks (read-only; all of them before the first run)."""
    return await WL_MIGRATIONS.pending(conninfo)
