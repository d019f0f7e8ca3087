"""Sends the example jobs of ``./scripts/dev`` once the worker is listening."""

from __future__ import annotations

import sys
import time

import psycopg

from pg_worker import Producer, resolve_database_url


def main() -> int:
    url, server = resolve_database_url()
    deadline = time.monotonic() + 60
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM pgworker.waiters WHERE queue_name = 'provisioning'").fetchone()
            if row and row[0]:
                break
            time.sleep(0.2)
        else:
            print("send_examples: the worker did not start listening within 60s", file=sys.stderr)
            return 1
        with Producer() as producer:
            producer.enqueue("provisioning", {"customer_id": 1001, "device": "rb4011-centro"}, type="activate", conn=conn)
            producer.enqueue("provisioning", {"customer_id": 1002}, type="suspend", conn=conn)
            producer.enqueue("provisioning", {"customer_id": 1003, "device": "hex-norte"}, type="activate", delay=3, conn=conn)
            producer.enqueue("provisioning", {"customer_id": 1004}, type="terminate", conn=conn)
            producer.enqueue("provisioning", {"customer_id": "not-a-number", "device": "x"}, type="activate", conn=conn)
            producer.enqueue("provisioning", {"note": "no handler for this"}, type="reboot", conn=conn)
    print("send_examples: sent 6 example jobs (one delayed 3s, one retried, three dead-lettered on purpose)", file=sys.stderr)
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
