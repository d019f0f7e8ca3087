"""The lease clock (one timer for every lease): each lease is lost just before its visibility timeout could
end, in order, whatever was released or renewed in between; a lease that is released is never lost."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pg_worker._app import QueueConfig
from pg_worker._events import WorkerObserver
from pg_worker._leases import LeaseKeeper


class _Lost(WorkerObserver):
    def __init__(self) -> None:
        self.lost: list[tuple[int, str, float]] = []

    def lease_lost(self, queue: str, msg_id: int, operation: str) -> None:
        self.lost.append((msg_id, operation, time.monotonic()))


async def test_one_clock_loses_each_lease_at_its_own_time() -> None:
    observer = _Lost()
    keeper = LeaseKeeper(db=None, observers=observer)  # type: ignore[arg-type]  # the clock needs no database
    queue = QueueConfig("q", visibility_timeout=1)  # lost 0.1 s before the 1 s lease ends
    start = time.monotonic()
    stopped: list[Any] = []
    late = keeper.hold(queue, 3, 1, start + 0.4)  # held first, expires last: the clock must not wait for it
    first = keeper.hold(queue, 1, 1, start)
    first.on_lost = stopped.append
    released = keeper.hold(queue, 2, 1, start + 0.1)
    renewed = keeper.hold(queue, 4, 1, start + 0.2)
    keeper.release(released)
    renewed.expires_at = start + 1.5  # as a renewal does
    keeper._arm(renewed)
    await asyncio.sleep(1.6)
    await asyncio.sleep(0.5)  # a busy machine may run the timer late; never early (checked below)
    assert sorted(msg_id for msg_id, _, _ in observer.lost) == [1, 3, 4]
    assert {operation for _, operation, _ in observer.lost} == {"lease_clock"}
    at = {msg_id: when - start for msg_id, _, when in observer.lost}
    assert at[1] >= 0.9 - 0.002, at
    assert at[3] >= 1.3 - 0.002, at
    assert at[4] >= 1.4 - 0.002, at  # only after its renewal's end
    assert at[1] < at[3], "the lease held later (but expiring earlier) was not waited for"
    assert stopped == [first] and not released.lost and late.lost == "expired"
    assert len(keeper) == 0
