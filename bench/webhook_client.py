"""The load generator of the webhook benchmark, in a process of its own (never the server's CPU time).

Requests are built and signed before the clock starts; each connection is a plain HTTP/1.1 keep-alive stream,
so the client's own cost stays small and equal for every server. Two modes, both bounded in count and time:

- ``--mode flat``: ``--connections`` connections send back to back until ``--count`` requests are answered;
  prints accepted requests per second.
- ``--mode rate``: requests are due at a fixed ``--rate``; each waits for a free connection, and its latency runs
  from when it was *due* (not when it was sent), so a slow server cannot hide its queueing (no coordinated
  omission). Prints the latencies.

Only 127.0.0.1 is allowed as the target. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from datetime import UTC, datetime

from standardwebhooks import Webhook

PATH = "/webhooks/standard"
TIME_LIMIT = 120.0


def build_requests(count: int, secret: str) -> list[bytes]:
    now = datetime.now(UTC)
    stamp = str(int(now.timestamp()))
    signer = Webhook(secret)
    requests = []
    run = uuid.uuid4().hex[:8]
    for n in range(count):
        msg_id = f"msg_bench_{run}_{n}"
        body = json.dumps(
            {
                "type": "payment.approved",
                "timestamp": now.isoformat(),
                "data": {"service_id": f"svc-{n % 500}", "payment_id": f"pay-{run}-{n}", "amount": "1500.00", "currency": "ARS"},
            },
            separators=(",", ":"),
        )
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"webhook-id: {msg_id}\r\nwebhook-timestamp: {stamp}\r\nwebhook-signature: {signer.sign(msg_id, now, body)}\r\n\r\n"
        )
        requests.append(head.encode() + body.encode())
    return requests


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length:
            await self.reader.readexactly(length)
        return status


async def _connect(port: int, n: int) -> list[Connection]:
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conns.append(Connection(reader, writer))
    return conns


async def flat(port: int, requests: list[bytes], connections: int) -> dict[str, float]:
    conns = await _connect(port, connections)
    pending = iter(requests)
    ok = 0

    async def drive(conn: Connection) -> None:
        nonlocal ok
        for request in pending:
            if await conn.exchange(request) == 200:
                ok += 1

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(drive(c) for c in conns)), TIME_LIMIT)
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.writer.close()
    return {"accepted": ok, "sent": len(requests), "seconds": elapsed, "per_second": ok / elapsed}


async def at_rate(port: int, requests: list[bytes], connections: int, rate: float) -> dict[str, object]:
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for conn in await _connect(port, connections):
        free.put_nowait(conn)
    latencies: list[float] = []
    ok = 0

    async def one(request: bytes, due: float) -> None:
        nonlocal ok
        conn = await free.get()
        try:
            if await conn.exchange(request) == 200:
                ok += 1
            latencies.append(time.perf_counter() - due)
        finally:
            free.put_nowait(conn)

    tasks = []
    start = time.perf_counter() + 0.05
    for n, request in enumerate(requests):
        due = start + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request, due)))
    await asyncio.wait_for(asyncio.gather(*tasks), TIME_LIMIT)
    return {"accepted": ok, "sent": len(requests), "latencies": latencies}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--mode", choices=("flat", "rate"), required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args()
    secret = os.environ["WEBHOOK_STANDARD_SECRETS"].split()[0]
    requests = build_requests(min(args.count, 100_000), secret)
    if args.mode == "flat":
        result: dict[str, object] = dict(asyncio.run(flat(args.port, requests, args.connections)))
    else:
        result = asyncio.run(at_rate(args.port, requests, args.connections, args.rate))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
