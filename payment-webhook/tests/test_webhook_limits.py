"""Bounded resources, through the uvicorn configuration ``serve`` uses: a body deadline (408), a connection and
request limit (503 at once), a database time budget per request (503 well before the provider gives up), and
readiness that returns as soon as the database does.

Before: 2,000 trickling connections stayed open 70 s; with webhook.events locked for 24 s requests waited 24 s
(Mercado Pago gives up at 22 s); after a 70 s outage the service answered 503 for 45 s more.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any

import httpx
import psycopg
import pytest

from webhook_fixtures import make_settings
from webhook_helpers import PgServer, RunningServer, billing_event, event_rows, serve, standard_request

Conn = psycopg.Connection[tuple[Any, ...]]
TRICKLERS = 50


def _port(server: RunningServer) -> int:
    return int(server.server.servers[0].sockets[0].getsockname()[1])


async def _trickle(port: int) -> bytes:
    """Headers, then a body that never completes: a byte now and then."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /webhooks/standard HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        await writer.drain()
        for _ in range(40):
            try:
                return await asyncio.wait_for(reader.read(4096), timeout=0.25)
            except TimeoutError:
                writer.write(b" ")
                await writer.drain()
        return b"still open"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def test_trickling_bodies_get_408_and_their_connections_close(webhook_db: str) -> None:
    with serve(make_settings(body_timeout_seconds=1.0), webhook_db) as server:
        started = time.monotonic()

        async def all_of_them() -> list[bytes]:
            return await asyncio.gather(*(_trickle(_port(server)) for _ in range(TRICKLERS)))

        replies = asyncio.run(all_of_them())
        assert all(reply.startswith(b"HTTP/1.1 408") for reply in replies), {r[:30] for r in replies}
        assert all(b"connection: close" in reply.lower() for reply in replies)
        assert time.monotonic() - started < 9  # each gets its answer after about 1 s, not when the client stops
        assert server.metric("webhook_rejections_total", provider="standard", reason="body_timeout") == TRICKLERS


def test_connections_beyond_the_limit_are_answered_503_at_once(webhook_db: str) -> None:
    with serve(make_settings(max_connections=4, body_timeout_seconds=30), webhook_db) as server:
        # uvicorn counts the connection asking too: with 3 held open, a 4th request reaches the limit.
        idle = [socket.create_connection(("127.0.0.1", _port(server)), timeout=10) for _ in range(3)]
        try:
            for sock in idle:  # hold each one with a request whose body is still coming
                sock.sendall(b"POST /webhooks/standard HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.3)
            body, headers = standard_request(billing_event(), "msg_over")
            response = httpx.post(server.base_url + "/webhooks/standard", content=body, headers=headers, timeout=5)
            assert response.status_code == 503
        finally:
            for sock in idle:
                sock.close()
        # Once they are gone, requests are served again.
        deadline = time.monotonic() + 10
        while True:
            response = httpx.post(server.base_url + "/webhooks/standard", content=body, headers=headers, timeout=5)
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert response.json()["status"] == "accepted"


def test_a_locked_table_is_a_503_within_the_database_budget(webhook_db: str, db: Conn) -> None:
    released = threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(webhook_db) as conn:
            conn.execute("LOCK TABLE webhook.events IN ACCESS EXCLUSIVE MODE")
            released.wait(30)

    locker = threading.Thread(target=hold_lock, daemon=True)
    with serve(make_settings(db_lock_timeout_seconds=0.5, db_statement_timeout_seconds=2), webhook_db) as server:
        locker.start()
        time.sleep(0.5)
        try:
            body, headers = standard_request(billing_event(), "msg_locked")
            started = time.monotonic()
            response = httpx.post(server.base_url + "/webhooks/standard", content=body, headers=headers, timeout=20)
            elapsed = time.monotonic() - started
        finally:
            released.set()
            locker.join(30)
        assert (response.status_code, response.json()["reason"]) == (503, "database_timeout")
        assert elapsed < 5
        assert server.metric("webhook_rejections_total", provider="standard", reason="database_timeout") == 1
        # The provider's retry, once the lock is gone, is taken.
        retried = httpx.post(server.base_url + "/webhooks/standard", content=body, headers=headers, timeout=20)
        assert retried.json()["status"] == "accepted"
    assert len(event_rows(db)) == 1


@pytest.mark.slow
def test_readiness_returns_within_2_s_of_the_database(webhook_pg: PgServer, webhook_db: str) -> None:
    with serve(make_settings(db_timeout_seconds=1.0), webhook_db) as server:
        assert httpx.get(server.base_url + "/readyz", timeout=10).status_code == 200
        webhook_pg.stop()
        try:
            # Long enough for psycopg_pool's uncapped backoff (1, 2, 4, 8, 16 s) to leave a gap of many seconds.
            outage_end = time.monotonic() + 17
            while time.monotonic() < outage_end:
                assert httpx.get(server.base_url + "/readyz", timeout=10).status_code == 503
                time.sleep(0.5)
        finally:
            webhook_pg.start()
        back = time.monotonic()
        while httpx.get(server.base_url + "/readyz", timeout=10).status_code != 200:
            assert time.monotonic() - back < 10, "not ready 10 s after the database came back"
            time.sleep(0.1)
        assert time.monotonic() - back < 2.0
