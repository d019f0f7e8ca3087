"""payment-webhook: accepted signed events per second and response time at a fixed offered load, against the bare
framework returning 200 (same uvicorn settings) measured in the same run.

Server and client are separate processes on 127.0.0.1. Ours does everything a real delivery costs: size and time
limits, Standard Webhooks HMAC, JSON with its strict checks, schema, event time window, amount and currency, one
transaction (its time budget and the service check, inserting the event, enqueueing its job), an INFO log line
(JSON) and the metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg

from payment_webhook import migrate

from .common import Row, Server, percentile

ROOT = Path(__file__).resolve().parent.parent
# A made-up secret for the benchmark's own throwaway database; never a real key.
SECRET = "whsec_YmVuY2gtb25seS1zZWNyZXQta2V5LTAwMDAwMA=="
CONNECTIONS = 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _server(kind: str, url: str) -> Iterator[int]:
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": url, "WEBHOOK_STANDARD_SECRETS": SECRET, "WEBHOOK_LOG_FORMAT": "json", "WEBHOOK_POOL_MAX_SIZE": "10"}
    if kind == "ours":
        command = [sys.executable, "-m", "payment_webhook", "serve", "--port", str(port)]
    else:
        command = [sys.executable, "-m", "bench.webhook_baseline", str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"{kind} server did not start: {log.read()[-2000:]!r}")
                time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _client(port: int, *args: str) -> dict[str, object]:
    env = {**os.environ, "WEBHOOK_STANDARD_SECRETS": SECRET}
    out = subprocess.run(
        [sys.executable, "-m", "bench.webhook_client", str(port), *args], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise RuntimeError(f"webhook client failed: {out.stderr[-2000:]}")
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _measure(kind: str, url: str, count: int, rate: float, rate_count: int) -> tuple[float, list[float]]:
    with _server(kind, url) as port:
        _client(port, "--mode", "flat", "--count", "100", "--connections", str(CONNECTIONS))  # warm-up
        flat = _client(port, "--mode", "flat", "--count", str(count), "--connections", str(CONNECTIONS))
        timed = _client(port, "--mode", "rate", "--count", str(rate_count), "--rate", str(rate), "--connections", str(CONNECTIONS))
    if flat["accepted"] != count or timed["accepted"] != rate_count:
        raise RuntimeError(f"{kind}: not every request was accepted ({flat['accepted']}/{count}, {timed['accepted']}/{rate_count})")
    latencies = timed["latencies"]
    assert isinstance(latencies, list)
    per_second = flat["per_second"]
    assert isinstance(per_second, float)
    return per_second, [float(v) for v in latencies]


def run(server: Server, *, quick: bool, repeat: int) -> list[Row]:
    count = 300 if quick else 4000
    rate = 100.0 if quick else 200.0
    rate_count = 200 if quick else 3000
    results: dict[str, dict[str, list[float]]] = {k: {"rps": [], "p50": [], "p99": []} for k in ("ours", "bare")}
    for _ in range(1 if quick else repeat):
        with server.database([], install=False) as url:
            asyncio.run(migrate(url))
            for kind in ("bare", "ours"):
                per_second, latencies = _measure(kind, url, count, rate, rate_count)
                results[kind]["rps"].append(per_second)
                results[kind]["p50"].append(percentile(latencies, 50) * 1000)
                results[kind]["p99"].append(percentile(latencies, 99) * 1000)
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT (SELECT count(*) FROM webhook.events), (SELECT count(*) FROM pgmq.q_device_actions)").fetchone()
            expected = 100 + count + rate_count
            if row != (expected, expected):
                raise RuntimeError(f"webhook benchmark: expected {expected} events and jobs, found {row}")
    base = "bare FastAPI returning 200"
    return [
        Row("webhook", f"accepted signed events/s, {CONNECTIONS} connections", "req/s", results["ours"]["rps"], results["bare"]["rps"], base),
        Row("webhook", f"response time p50 @ {rate:.0f} req/s", "ms", results["ours"]["p50"], results["bare"]["p50"], base, higher_is_better=False),
        Row("webhook", f"response time p99 @ {rate:.0f} req/s", "ms", results["ours"]["p99"], results["bare"]["p99"], base, higher_is_better=False),
    ]
