"""``wl-console migrate`` and ``wl-console user ...`` as an operator runs them (through ``main``)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import psycopg
import pytest

from console_helpers import fetch_all
from pg_worker.testing import PgServer
from wl_console import migrate
from wl_console.cli import main


@pytest.fixture
def empty_db(console_pg: PgServer) -> Iterator[str]:
    with console_pg.clone(prefix="console_empty") as url:  # template0: no schema at all
        yield url


async def test_migrate_alone_is_idempotent_and_adds_indexes_once_their_tables_exist(empty_db: str) -> None:
    first = await migrate(empty_db)
    assert first.applied == ["0001_accounts.sql"] and first.indexes == []
    assert any("wl.customer_services does not exist yet" in s for s in first.indexes_skipped)
    async with await psycopg.AsyncConnection.connect(empty_db, autocommit=True) as conn:
        await conn.execute("CREATE SCHEMA wl; CREATE TABLE wl.customer_services (service_id text PRIMARY KEY, target text)")
        await conn.execute("CREATE SCHEMA webhook; CREATE TABLE webhook.events (id bigint PRIMARY KEY)")  # before its service_id column
    second = await migrate(empty_db)
    assert second.applied == [] and second.current == 1
    assert second.indexes == ["console_services_id_pattern_idx", "console_services_target_pattern_idx"]
    assert any("webhook.events lacks the column" in s for s in second.indexes_skipped)
    assert "console_events_event_idx" not in second.indexes  # event_id is not there either in this made-up table
    indexes = await fetch_all(empty_db, "SELECT indexname FROM pg_indexes WHERE indexname LIKE 'console%%' ORDER BY 1")
    assert [i[0] for i in indexes] == ["console_services_id_pattern_idx", "console_services_target_pattern_idx"]


def test_user_commands(console_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", console_db)
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert main(["user", "add", "Ana", "--role", "operator", "--password-stdin"]) == 0
    assert "user Ana (operator) added" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["user", "passwd", "ana", "--password-stdin"]) == 2
    assert "at least 12 characters" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("another long password\n"))
    assert main(["user", "add", "ana", "--role", "viewer", "--password-stdin"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["user", "role", "ana", "admin"]) == 0
    assert main(["user", "disable", "ana"]) == 0
    assert main(["user", "disable", "nobody"]) == 2
    assert "no user named 'nobody'" in capsys.readouterr().err
    assert main(["user", "list"]) == 0
    listed = capsys.readouterr().out
    assert "ana" in listed and "admin" in listed and "disabled" in listed
    with psycopg.connect(console_db, autocommit=True) as conn:
        rows = conn.execute("SELECT action, target, detail FROM console.audit ORDER BY id").fetchall()
    assert [(a, t) for a, t, _ in rows] == [("user.add", "ana"), ("user.role", "ana"), ("user.disable", "ana")]
    assert rows[1][2] == {"old": "operator", "new": "admin"}
    assert all("password" not in str(d) for _, _, d in rows)


def test_serve_refuses_a_missing_or_short_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://unused")
    monkeypatch.delenv("WL_CONSOLE_SECRET_KEY", raising=False)
    with pytest.raises(SystemExit, match="set WL_CONSOLE_SECRET_KEY"):
        main(["serve"])
    monkeypatch.setenv("WL_CONSOLE_SECRET_KEY", "too-short")
    with pytest.raises(SystemExit, match="at least 32 characters") as raised:
        main(["serve"])
    assert "too-short" not in str(raised.value)
