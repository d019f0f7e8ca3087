"""Sends the example jobs of ``demo:app`` (see pg-worker/README.md) once the worker is listening.

Three of them fail on purpose (a permanent failure, an invalid payload, an unknown type) to show dead-lettering.
They carry the header ``{"example": "scripts/dev"}``; before sending, the dead letters of earlier runs with that
header are purged, so the dead-letter queue holds the same three after every start (and nothing else is touched).
"""

from __future__ import annotations

import logging
import signal
import sys
import time

import psycopg

from pg_worker import Producer, admin, resolve_database_url
from pg_worker.logging_setup import configure_logging

log = logging.getLogger("send_examples")
QUEUE = "provisioning"
HEADERS = {"example": "scripts/dev"}


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # atexit hooks run: this process's handle on the embedded server is released


def purge_earlier_examples(conn: psycopg.Connection[object]) -> int:
    earlier = [d.dlq_id for d in admin.dlq_list(conn, QUEUE, limit=10_000) if d.body.get("headers") == HEADERS]
    return len(admin.dlq_purge(conn, QUEUE, earlier)) if earlier else 0


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    configure_logging()
    url, server = resolve_database_url()
    deadline = time.monotonic() + 60
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            try:
                row = conn.execute("SELECT count(*) FROM pgworker.waiters WHERE queue_name = %s", (QUEUE,)).fetchone()
            except psycopg.errors.UndefinedTable:  # a fresh database: the worker has not installed pg-worker yet
                row = None
            if row and row[0]:
                break
            time.sleep(0.2)
        else:
            log.error("examples_not_sent", extra={"event": "examples_not_sent", "reason": "the worker did not start listening within 60s"})
            return 1
        purged = purge_earlier_examples(conn)
        with Producer() as producer:
            for payload, job_type, delay in (
                ({"customer_id": 1001, "device": "rb4011-centro"}, "activate", None),
                ({"customer_id": 1002}, "suspend", None),  # retried once: the device is "busy" on the first attempt
                ({"customer_id": 1003, "device": "hex-norte"}, "activate", 3),
                ({"customer_id": 1004}, "terminate", None),  # dead-lettered: PermanentFailure
                ({"customer_id": "not-a-number", "device": "x"}, "activate", None),  # dead-lettered: invalid payload
                ({"note": "no handler for this"}, "reboot", None),  # dead-lettered: unknown type
            ):
                producer.enqueue(QUEUE, payload, type=job_type, delay=delay, headers=HEADERS, conn=conn)
    log.info(
        "examples_sent",
        extra={
            "event": "examples_sent",
            "jobs": 6,
            "note": "one delayed 3s, one retried, three dead-lettered on purpose: pg-worker dlq list provisioning",
            "earlier_examples_purged": purged,
        },
    )
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
