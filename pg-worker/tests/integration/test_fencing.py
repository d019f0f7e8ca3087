"""Every write about a held message is fenced by the delivery it holds (msg_id and read_ct)."""

from __future__ import annotations

import time

import pg_worker
from helpers import RecordingObserver, dlq_messages, expire, queue_rows, read_one
from pg_worker import Producer, WorkerConfig
from pg_worker._completer import Completer
from pg_worker._db import Database, WorkerHealth
from pg_worker._events import ObserverGroup
from pg_worker._leases import LeaseKeeper


async def test_a_stale_workers_late_writes_change_nothing_of_the_new_delivery(db_url: str, producer: Producer) -> None:
    await pg_worker.install(db_url, ["jobs"])
    msg_id = producer.enqueue("jobs", {"n": 1})
    _, stale_ct = await read_one(db_url, "jobs")  # worker A's delivery
    await expire(db_url, "jobs")  # A's lease ran out...
    _, current_ct = await read_one(db_url, "jobs", vt=300)  # ...and worker B holds the message now
    assert current_ct == stale_ct + 1
    before = await queue_rows(db_url, "jobs")

    config = WorkerConfig()
    observer = RecordingObserver()
    observers = ObserverGroup([observer])
    db = Database(db_url, config, observers, WorkerHealth(), max_size=2)
    await db.open()
    try:
        leases = LeaseKeeper(db, observers)
        queue = pg_worker.QueueConfig("jobs")
        completer = Completer(db, leases, {"jobs": queue})
        stale = [leases.hold(queue, msg_id, stale_ct, time.monotonic()) for _ in range(4)]
        assert await completer.retry(stale[0], 0.0) is False
        assert await completer.dead_letter(stale[1], {"reason": "late"}) is False
        await completer.hand_back([stale[2]])
        completer.ack(stale[3])
        completer.begin_close()
        await completer.flush(time.monotonic() + 5)
    finally:
        await db.close()
    assert await queue_rows(db_url, "jobs") == before, "B's delivery (vt, read_ct) untouched"
    assert await dlq_messages(db_url, "jobs") == []
    assert all(not lease.held for lease in stale)
    assert sorted(op for _, _, op in observer.leases_lost) == ["ack", "dead_letter", "hand_back", "retry"]


