"""``payment-webhook migrate``: the webhook schema and the queues, idempotent, safe when run twice at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import psycopg
import pytest

from payment_webhook import QUEUES, migrate


async def _twice_at_once(url: str) -> list[list[int]]:
    reports = await asyncio.gather(migrate(url), migrate(url))
    return [r.applied for r in reports]


def test_two_migrations_at_once_apply_each_version_once(blank_db: str) -> None:
    applied = asyncio.run(_twice_at_once(blank_db))
    assert sorted(applied) == [[], [1, 2]]
    with psycopg.connect(blank_db) as conn:
        assert conn.execute("SELECT version FROM webhook.schema_migrations ORDER BY version").fetchall() == [(1,), (2,)]
        constraint = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'events_provider_event_id_key'"
        ).fetchone()
        assert constraint == ("UNIQUE (provider, event_id)",)
        queues = {row[0] for row in conn.execute("SELECT queue_name FROM pgmq.list_queues()").fetchall()}
        assert set(QUEUES) <= queues
    again = asyncio.run(migrate(blank_db))
    assert again.applied == []
    assert again.current == 2


def test_a_database_from_a_newer_release_is_refused(blank_db: str) -> None:
    asyncio.run(migrate(blank_db))
    with psycopg.connect(blank_db, autocommit=True) as conn:
        conn.execute("INSERT INTO webhook.schema_migrations (version, name) VALUES (99, 'future')")
    with pytest.raises(RuntimeError, match=r"does not know: \[99\]"):
        asyncio.run(migrate(blank_db))


def test_migrate_command(blank_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": blank_db, "WEBHOOK_LOG_FORMAT": "json"}
    result = subprocess.run([sys.executable, "-m", "payment_webhook", "migrate"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "webhook schema at version 2 (applied now: 1, 2)" in result.stdout
    assert "device_actions" in result.stdout
