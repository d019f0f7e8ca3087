"""pg_worker.migrations: the versioned SQL migrations that wl-workers and wl-console keep in their packages."""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path

import psycopg
import pytest

from pg_worker.migrations import Migration, MigrationError, Migrations


@pytest.fixture
def migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Migrations:
    package = tmp_path / "demo_migrations"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "0001_things.sql").write_text("CREATE TABLE demo.things (id int PRIMARY KEY);")
    (package / "0002_more.sql").write_text("ALTER TABLE demo.things ADD COLUMN name text;")
    (package / "notes.txt").write_text("not a migration")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "demo_migrations", raising=False)  # each test's package is its own
    importlib.invalidate_caches()
    return Migrations(package="demo_migrations", schema="demo", lock_key=0x0DE30001, label="demo")


async def test_concurrent_runs_apply_each_migration_once(db_url: str, migrations: Migrations) -> None:
    assert await migrations.pending(db_url) == ["0001_things.sql", "0002_more.sql"]
    reports = await asyncio.gather(*(migrations.migrate(db_url) for _ in range(3)))
    assert sorted(len(r.applied) for r in reports) == [0, 0, 2]
    assert {r.current for r in reports} == {2}
    assert await migrations.pending(db_url) == []
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT version, name FROM demo.schema_migrations ORDER BY version")
        assert await cur.fetchall() == [(1, "0001_things.sql"), (2, "0002_more.sql")]
        await conn.execute("INSERT INTO demo.things (id, name) VALUES (1, 'x')")


async def test_an_edited_or_unknown_migration_is_refused(db_url: str, migrations: Migrations) -> None:
    await migrations.migrate(db_url)
    first, second = migrations.load()
    with pytest.raises(MigrationError, match=r"0001_things\.sql changed after it was applied"):
        await migrations.migrate(db_url, [Migration(first.version, first.name, first.sql + "\n-- edited"), second])
    with pytest.raises(MigrationError, match=r"the database has demo migrations this package does not know: \[2\]"):
        await migrations.migrate(db_url, [first])


def test_a_gap_in_the_versions_is_refused(tmp_path: Path, migrations: Migrations) -> None:
    (tmp_path / "demo_migrations" / "0004_later.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"without gaps, found \[1, 2, 4\]"):
        migrations.load()
