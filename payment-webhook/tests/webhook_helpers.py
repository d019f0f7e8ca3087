"""Test helpers: signing like the providers do, a uvicorn server in a thread, and database look-ups."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import uvicorn
from fastapi import FastAPI
from standardwebhooks import Webhook

from payment_webhook import WebhookSettings, create_app, sign_mercadopago
from payment_webhook._app import Service
from pg_worker.testing import PgServer as PgServer  # re-exported: the tests import it from here

# Test-only secrets, made up here (never real keys). Two of each: a rotation in progress.
STANDARD_SECRETS = ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_dGVzdC1zZWNvbmQtc2VjcmV0LXJvdGF0ZWQ=")
MP_SECRETS = ("mp-test-secret-current", "mp-test-secret-next")


@dataclass
class RunningServer:
    base_url: str
    app: FastAPI
    server: uvicorn.Server

    @property
    def service(self) -> Service:
        service: Service = self.app.state.service
        return service

    def metric(self, name: str, **labels: str) -> float:
        value = self.service.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextmanager
def serve_app(app: FastAPI) -> Iterator[RunningServer]:
    """uvicorn on 127.0.0.1, an ephemeral port, in a thread; stopped (and its lifespan closed) on exit."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"


@contextmanager
def serve(settings: WebhookSettings, conninfo: str, **kwargs: Any) -> Iterator[RunningServer]:
    with serve_app(create_app(settings, conninfo=conninfo, **kwargs)) as running:
        yield running


@contextmanager
def serve_process(db_url: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``payment-webhook serve`` as a process on 127.0.0.1 (an ephemeral port); yields its base URL."""
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "WEBHOOK_STANDARD_SECRETS": " ".join(STANDARD_SECRETS),
        "WEBHOOK_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "payment_webhook", "serve", "--host", "127.0.0.1", "--port", "0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    base_url = ""
    deadline = time.monotonic() + 30
    lines = []
    try:
        while not base_url and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if match:
                base_url = match.group(1)
        assert base_url, "".join(lines)
        yield base_url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def billing_event(event_type: str = "payment.approved", service_id: str = "svc-1001", **data: Any) -> dict[str, Any]:
    body_data: dict[str, Any] = {"service_id": service_id, "amount": "1500.00", "currency": "ARS"}
    if event_type.startswith("payment."):
        body_data["payment_id"] = "pay-1"
    body_data.update(data)
    return {"type": event_type, "timestamp": "2026-11-29T18:00:00-03:00", "data": body_data}


def standard_request(
    event: dict[str, Any] | bytes, msg_id: str = "msg_1", *, secret: str = STANDARD_SECRETS[0], ts: float | None = None
) -> tuple[bytes, dict[str, str]]:
    """Body and headers as a Standard Webhooks sender makes them, signed by the reference implementation."""
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    when = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body.decode()),
    }
    return body, headers


def mp_request(
    data_id: str = "123456789", notification_id: str = "n-1", *, secret: str = MP_SECRETS[0], ts: str | None = None,
    request_id: str = "req-1", kind: str = "payment",
) -> tuple[str, bytes, dict[str, str]]:
    """Query string, body and headers of a Mercado Pago notification."""
    stamp = ts or str(int(time.time()))
    body = {"action": "payment.updated", "api_version": "v1", "data": {"id": data_id}, "date_created": "2026-11-29T21:00:00Z",
            "id": notification_id, "live_mode": False, "type": kind, "user_id": 44}
    headers = {"content-type": "application/json", "x-request-id": request_id, "x-signature": sign_mercadopago(secret, data_id, request_id, stamp)}
    return f"?data.id={data_id}&type={kind}", json.dumps(body).encode(), headers


def events(conn: psycopg.Connection[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT provider, event_id, type, event_at, queue, msg_id FROM webhook.events ORDER BY id").fetchall()


def queue(conn: psycopg.Connection[tuple[Any, ...]], name: str) -> list[dict[str, Any]]:
    rows = conn.execute(f"SELECT message FROM pgmq.q_{name} ORDER BY msg_id").fetchall()  # name: a test constant
    return [row[0] for row in rows]
