"""wl-console at ISP size: p95 server time of the customer search and the router list (target < 100 ms), on
10 routers and 20,000 customer services made by ``generate`` (with history, payments, pending jobs and dead
letters around them, as a real database has).

Server time is the app's own ``Server-Timing`` (request in to response start: session check, queries, template),
measured in process through httpx's ASGI transport against a real PostgreSQL. The baseline is the same requests
with the console's search indexes dropped (``wl-console migrate`` creates them on wl's tables), so the table
shows what those indexes buy.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from pydantic import SecretStr

import pg_worker

from .common import Row, Server, percentile

ROOT = Path(__file__).resolve().parent.parent
SECRET_KEY = "bench-only-session-key-0123456789abcdef"
TARGET_MS = 100.0


def generate(url: str, *, routers: int = 10, services: int = 20_000, history_per_service: int = 5) -> None:
    """Routers r01..rNN and services cust-000001.. spread over them: 10% PPPoE, 5% suspended, 1% diverged, 0.5% with
    an error; ``history_per_service`` history rows each, a payment event for one in four, 200 pending jobs and 50
    dead letters."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO wl.devices (name, host, username, password_ref) "
            "SELECT format('r%%s', lpad(i::text, 2, '0')), format('10.255.0.%%s', i), 'api', 'env:ROUTER_PASSWORD' "
            "FROM generate_series(1, %s) i", (routers,))
        conn.execute(
            """
            INSERT INTO wl.customer_services (service_id, device_id, method, target, desired_state, applied_state, applied_at,
                                              observed_state, observed_at, last_error, last_error_at)
            SELECT format('cust-%%s', lpad(i::text, 6, '0')),
                   (SELECT id FROM wl.devices ORDER BY name OFFSET (i %% %s) LIMIT 1),
                   CASE WHEN i %% 10 = 0 THEN 'pppoe' ELSE 'address-list' END,
                   CASE WHEN i %% 10 = 0 THEN format('pppoe-%%s', i)
                        ELSE format('10.%%s.%%s.%%s', 1 + i / 65536, (i / 256) %% 256, i %% 256) END,
                   CASE WHEN i %% 20 = 0 THEN 'suspended' ELSE 'active' END,
                   CASE WHEN i %% 100 = 1 THEN 'suspended' WHEN i %% 20 = 0 THEN 'suspended' ELSE 'active' END,
                   now(),
                   CASE WHEN i %% 20 = 0 THEN 'suspended' ELSE 'active' END, now(),
                   CASE WHEN i %% 200 = 3 THEN 'transient: connection timed out' END,
                   CASE WHEN i %% 200 = 3 THEN now() END
            FROM generate_series(1, %s) i
            """, (routers, services))
        conn.execute(
            "INSERT INTO wl.service_history (service_id, at, kind, source, actor, reason, state, outcome) "
            "SELECT s.service_id, now() - make_interval(days => k), "
            "       (ARRAY['event_accepted', 'router_action', 'router_read', 'desired_changed', 'operator'])[1 + k %% 5], "
            "       'worker', NULL, 'generated', 'active', 'applied' "
            "FROM wl.customer_services s, generate_series(1, %s) k", (history_per_service,))
        conn.execute(
            "INSERT INTO webhook.events (provider, event_id, type, payload, outcome, service_id, payment_id, amount, currency) "
            "SELECT 'standard', format('ev-%%s', i), 'payment.approved', '{}', 'accepted', format('cust-%%s', lpad(i::text, 6, '0')), "
            "       format('pay-%%s', i), 100, 'ARS' FROM generate_series(1, %s, 4) i", (services,))
        conn.execute("SELECT pgmq.send('device_actions', jsonb_build_object('type', 'service.refresh', 'service_id', format('cust-%%s', lpad((i * 97)::text, 6, '0')))) "
                     "FROM generate_series(1, 200) i")
        conn.execute("SELECT pgmq.send('device_actions_dlq', jsonb_build_object('queue', 'device_actions', 'message', "
                     "jsonb_build_object('type', 'service.activate', 'service_id', format('cust-%%s', lpad((i * 31)::text, 6, '0'))), "
                     "'error', jsonb_build_object('reason', 'max_attempts', 'message', 'timed out'))) FROM generate_series(1, 50) i")
        conn.execute("ANALYZE")


async def _prepare(url: str) -> None:
    from payment_webhook import migrate as webhook_migrate
    from wl_console import migrate as console_migrate
    from wl_workers._migrate import migrate as wl_migrate
    from wl_workers.settings import QUEUES

    await wl_migrate(url)
    await pg_worker.install(url, list(QUEUES))
    await webhook_migrate(url)
    await console_migrate(url)


REQUESTS = {
    "customer search": [
        "/customers", "/customers?q=cust-0123", "/customers?q=cust-019999", "/customers?q=10.1.20.7", "/customers?q=pppoe-1230",
        "/customers?q=r07", "/customers?q=10.1.3.0/24", "/customers?suspended=1", "/customers?diverged=1", "/customers?errors=1",
        "/customers?pending=1", "/customers?q=r03&suspended=1", "/customers?after=cust-015000",
    ],
    "router list": ["/routers"],
    "customer page": ["/customers/cust-000100", "/customers/cust-001234"],
}


async def _measure(url: str, rounds: int) -> dict[str, list[float]]:
    from wl_console import ConsoleSettings, create_app
    from wl_console.sessions import SESSION_COOKIE, Signer, create_session

    settings = ConsoleSettings(secret_key=SecretStr(SECRET_KEY), cookie_secure=False, pool_min_size=1, pool_max_size=4)
    app = create_app(settings, conninfo=url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("INSERT INTO console.users (username, role, password_hash) VALUES ('bench', 'viewer', '$argon2id$bench') "
                                 "ON CONFLICT (username) DO UPDATE SET role = 'viewer' RETURNING id")
        row = await cur.fetchone()
        assert row is not None
        token = await create_session(conn, int(row[0]), "bench", datetime.now(UTC))
    times: dict[str, list[float]] = {name: [] for name in REQUESTS}
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        client.cookies.set(SESSION_COOKIE, Signer(SECRET_KEY.encode()).sign("session", token))
        for path in (p for paths in REQUESTS.values() for p in paths):  # warm-up: pool, prepared statements, caches
            response = await client.get(path)
            assert response.status_code == 200, (path, response.status_code)
        for _ in range(rounds):
            for name, paths in REQUESTS.items():
                for path in paths:
                    response = await client.get(path)
                    timing = re.search(r"dur=([\d.]+)", response.headers["server-timing"])
                    assert timing is not None
                    times[name].append(float(timing.group(1)))
    return times


def _drop_console_indexes(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for (name,) in conn.execute("SELECT schemaname || '.' || indexname FROM pg_indexes WHERE indexname LIKE 'console\\_%%'").fetchall():
            conn.execute(f"DROP INDEX {name}")  # names from the catalogue, console_* only
        conn.execute("ANALYZE")


def run(pg: Server, *, quick: bool = False, repeat: int = 3) -> list[Row]:
    services = 2_000 if quick else 20_000
    rounds = 3 if quick else 20
    rows = {name: Row("console", f"{name} p95 server time ({services:,} services)", "ms", baseline_name="without the console's indexes",
                      target=f"< {TARGET_MS:.0f} ms", higher_is_better=False) for name in REQUESTS}
    for _ in range(1 if quick else repeat):
        with pg.database([], install=False) as url:
            asyncio.run(_prepare(url))
            started = time.monotonic()
            generate(url, services=services)
            print(f"#   generated {services:,} services in {time.monotonic() - started:.1f} s", flush=True)
            for name, values in asyncio.run(_measure(url, rounds)).items():
                rows[name].ours.append(percentile(values, 95))
            _drop_console_indexes(url)
            for name, values in asyncio.run(_measure(url, rounds)).items():
                rows[name].baseline.append(percentile(values, 95))
    return list(rows.values())


def main() -> None:
    """``python -m bench.bench_console``: this benchmark alone, on DATABASE_URL or an embedded server. (``run`` has
    the signature of the suite's benchmarks, to be listed in ``bench/__main__.py`` beside the others.)"""
    from .__main__ import print_table
    from .common import server

    with server() as pg:
        print_table(run(pg, repeat=1))


if __name__ == "__main__":
    main()


__all__: list[Any] = ["generate", "run"]
