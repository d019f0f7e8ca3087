"""A producer in its own process: sends ``count`` messages at ``rate`` per second, each stamped with its send time."""

from __future__ import annotations

import argparse
import time

import psycopg
from psycopg.types.json import Jsonb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("queue")
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--start-at", type=float, default=None, help="epoch seconds: wait, then send (a start line for several producers)")
    parser.add_argument("--flat-out", action="store_true", help="no rate: send as fast as one connection can; print only the end time")
    args = parser.parse_args()
    if args.flat_out:
        flat_out(args.url, args.queue, args.count, args.start_at)
        return
    interval = 1.0 / args.rate
    with psycopg.connect(args.url, autocommit=True) as conn:
        start = time.monotonic()
        for i in range(args.count):
            target = start + i * interval
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            row = conn.execute("SELECT pgmq.send(%s, %s)", (args.queue, Jsonb({"n": i, "sent_at": time.time()}))).fetchone()
            assert row is not None
            # When the commit returned: the job exists from here on. One line per job, read by the benchmark.
            print(f"{row[0]} {time.time():.6f}", flush=False)


def flat_out(url: str, queue: str, count: int, start_at: float | None) -> None:
    """One message per transaction, back to back."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT 1")
        if start_at is not None:
            time.sleep(max(0.0, start_at - time.time()))
        message = Jsonb({"n": 0})
        for _ in range(count):
            conn.execute("SELECT pgmq.send(%s, %s)", (queue, message))
    print(f"{time.time():.6f}")


if __name__ == "__main__":
    main()
