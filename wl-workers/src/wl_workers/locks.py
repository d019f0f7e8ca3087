"""Per-service mutual exclusion and the per-device limit, as *session* advisory locks on one dedicated
connection per job (or per reconcile device read), checked before and after every router write.

Why not transaction locks: a job must not hold a transaction open across router calls (seconds), and a lock that
dies with its connection (backend terminated, database restart, network blip) must be *noticed*. The job's
connection holds no transaction; the locks are session-level on it; ``check()`` asks PostgreSQL how many
advisory locks this session still holds. A dead connection or a missing lock raises :class:`LockLost`: the job
stops writing, says so (log ``lock_lost``, metric ``wl_lock_lost_total``, a history row) and is retried without
using an attempt; its retry converges against the newest desired state, undoing a write that landed late.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import psycopg

from . import _sql
from ._store import Device


class LockLost(Exception):
    """The locks that made a router write safe are gone (connection lost, or released under us)."""


class SessionLocks:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.held = 0
        self.device_id: int | None = None

    async def _try(self, query: str, params: tuple[Any, ...]) -> bool:
        cur = await self.conn.execute(query, params)
        row = await cur.fetchone()
        if row is not None and row[0]:
            self.held += 1
            return True
        return False

    async def try_service(self, service_id: str) -> bool:
        return await self._try(_sql.TRY_SERVICE_LOCK, (service_id,))

    async def try_device_slot(self, device: Device) -> bool:
        """One of the device's ``max_concurrent`` slots, or ``False`` when all are taken (no waiting: a job that
        waits would hold a worker's place that a job for another, healthy router could use)."""
        first = random.randrange(device.max_concurrent)  # spread the tries over the slots
        for i in range(device.max_concurrent):
            slot = (first + i) % device.max_concurrent
            if await self._try(_sql.TRY_DEVICE_SLOT_SESSION, (device.name, slot)):
                self.device_id = device.id
                return True
        return False

    async def wait_for_device_slot(self, device: Device, limit: float) -> bool:
        """Wait up to ``limit`` seconds for a slot, if one of the device's ``max_concurrent`` waiting places is
        free; ``False`` at once when they are all taken (the caller parks the job)."""
        for place in range(device.max_concurrent):
            if await self._try(_sql.TRY_DEVICE_WAIT, (device.name, place)):
                break
        else:
            return False
        try:
            deadline = asyncio.get_running_loop().time() + limit
            got = await self.try_device_slot(device)
            while not got and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02 + random.random() * 0.02)
                got = await self.try_device_slot(device)
            return got
        finally:
            await self.conn.execute(_sql.LEAVE_DEVICE_WAIT, (device.name, place))
            self.held -= 1

    async def check(self) -> None:
        """Raise :class:`LockLost` unless this session still holds every lock it took."""
        try:
            cur = await self.conn.execute(_sql.HELD_LOCKS)
            row = await cur.fetchone()
        except psycopg.Error as exc:
            raise LockLost(f"lock connection lost ({type(exc).__name__}: {str(exc).strip() or 'no detail'})") from exc
        held = int(row[0]) if row else 0
        if held < self.held:
            raise LockLost(f"this session holds {held} of its {self.held} advisory locks")

    async def release(self) -> None:
        if self.held and not self.conn.closed:
            with contextlib.suppress(psycopg.Error):
                await self.conn.execute(_sql.UNLOCK_ALL)
        self.held = 0
        self.device_id = None
