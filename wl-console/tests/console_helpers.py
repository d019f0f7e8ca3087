"""Helpers of wl-console's tests: settings, users and signed sessions per role, seeded customers and routers,
and an httpx client on the app in process (``Harness.client(role)``, as Datasette's ``client.get(actor=...)``)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
from fastapi import FastAPI
from psycopg.types.json import Jsonb

from wl_console.accounts import hash_password
from wl_console.sessions import SESSION_COOKIE, Signer, create_session
from wl_console.settings import ConsoleSettings
from wl_workers._store import add_device, add_service

SECRET_KEY = "test-key-0123456789abcdef0123456789abcdef"
PASSWORD = "correct horse battery staple"
ROLES = ("viewer", "operator", "admin")
BASE_URL = "http://console.test"
_HASH: dict[str, str] = {}


def password_hash() -> str:
    if "h" not in _HASH:
        _HASH["h"] = hash_password(PASSWORD)  # argon2 is slow on purpose: once per test session
    return _HASH["h"]


def console_settings(**overrides: Any) -> ConsoleSettings:
    values: dict[str, Any] = {"secret_key": SECRET_KEY, "cookie_secure": False, "page_size": 20, "pool_min_size": 0, "pool_max_size": 4}
    values.update(overrides)
    return ConsoleSettings(**values)


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def add_user_row(url: str, username: str, role: str, *, disabled: bool = False) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "INSERT INTO console.users (username, role, password_hash, disabled) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (username) DO UPDATE SET role = excluded.role RETURNING id",
            (username, role, password_hash(), disabled),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


@dataclass
class Harness:
    url: str
    clock: FakeClock = field(default_factory=FakeClock)
    app: FastAPI | None = None
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def signer(self) -> Signer:
        return Signer(SECRET_KEY.encode())

    def anonymous(self) -> httpx.AsyncClient:
        assert self.app is not None
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=BASE_URL, follow_redirects=False)
        self.clients.append(client)
        return client

    async def client(self, role: str, username: str | None = None) -> SignedClient:
        """A client whose cookie carries a signed session of a user with ``role`` (made if missing)."""
        name = username or role
        user_id = await add_user_row(self.url, name, role)
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            token = await create_session(conn, user_id, "test", datetime.fromtimestamp(self.clock(), UTC))
        client = self.anonymous()
        client.cookies.set(SESSION_COOKIE, self.signer.sign("session", token))
        return SignedClient(client, self.signer.csrf_token(token), name)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


@dataclass
class SignedClient:
    http: httpx.AsyncClient
    csrf: str
    username: str

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.http.get(path, **kwargs)

    async def post(self, path: str, data: dict[str, Any] | None = None, *, csrf: bool = True, **kwargs: Any) -> httpx.Response:
        form = dict(data or {})
        if csrf:
            form["csrf_token"] = self.csrf
        return await self.http.post(path, data=form, **kwargs)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no csrf_token in the page"
    return match.group(1)


# -- data -------------------------------------------------------------------------------------------------------

async def seed(url: str, *, router: str = "r1", services: int = 3, port: int = 9) -> list[str]:
    """A router and ``services`` customers (c1, c2, ...) on it; c2 suspended-and-diverged, c3 with an error."""
    ids = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await add_device(conn, name=router, host="127.0.0.1", port=port, scheme="http", username="api", password_ref="env:WL_TEST_ROUTER_PASSWORD")
        for i in range(1, services + 1):
            service_id = f"c{i}" if router == "r1" else f"{router}-c{i}"
            await add_service(conn, service_id, router, "address-list", f"10.0.{i // 250}.{i % 250 + 1}")
            ids.append(service_id)
        await conn.execute("UPDATE wl.customer_services SET applied_state = desired_state, applied_generation = 1, observed_state = desired_state "
                           "WHERE service_id = ANY(%s)", (ids,))
        if services >= 2:
            await conn.execute("UPDATE wl.customer_services SET desired_state = 'suspended', desired_generation = 2 WHERE service_id = %s", (ids[1],))
        if services >= 3:
            await conn.execute("UPDATE wl.customer_services SET last_error = 'transient: connection refused', last_error_at = now() WHERE service_id = %s", (ids[2],))
    return ids


def dead_letter_body(message: dict[str, Any], *, queue: str = "device_actions", reason: str = "max_attempts") -> dict[str, Any]:
    """A dead letter shaped as pg-worker writes it (see pg_worker/_sql.py dead_letter)."""
    return {"queue": queue, "msg_id": 41, "message": message, "headers": None, "attempts": 12, "enqueued_at": "2026-11-30T10:00:00+00:00",
            "failed_at": "2026-11-30T10:30:00+00:00",
            "error": {"reason": reason, "type": "wl_workers.drivers.TransientDeviceError", "message": "connection refused", "traceback": "..."}}


def add_dead_letter_sync(url: str, message: dict[str, Any], *, queue: str = "device_actions") -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pgmq.send(%s, %s)", (f"{queue}_dlq", Jsonb(dead_letter_body(message, queue=queue)))).fetchone()
        assert row is not None
        return int(row[0])


async def add_dead_letter(url: str, message: dict[str, Any], *, queue: str = "device_actions", reason: str = "max_attempts") -> int:
    body = dead_letter_body(message, queue=queue, reason=reason)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT pgmq.send(%s, %s)", (f"{queue}_dlq", Jsonb(body)))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def fetch_all(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return list(await cur.fetchall())
