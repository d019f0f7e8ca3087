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
    args = parser.parse_args()
    interval = 1.0 / args.rate
    with psycopg.connect(args.url, autocommit=True) as conn:
        start = time.monotonic()
        for i in range(args.count):
            target = start + i * interval
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            conn.execute("SELECT pgmq.send(%s, %s)", (args.queue, Jsonb({"n": i, "sent_at": time.time()})))


if __name__ == "__main__":
    main()
