"""The worker's concurrency limit: slots that fetch loops take before reading and jobs give back."""

from __future__ import annotations

import asyncio


class Slots:
    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._available = asyncio.Event()
        self._available.set()
        self._all_free = asyncio.Event()
        self._all_free.set()
        self._closed = False

    async def take(self, want: int) -> int:
        """Wait until at least one slot is free, then take up to ``want``; 0 once :meth:`close` was called."""
        while self.free == 0 and not self._closed:
            self._available.clear()
            await self._available.wait()
        return self.take_nowait(want)

    def take_nowait(self, want: int) -> int:
        """Take up to ``want`` of the free slots, without waiting: 0 if none is free or after :meth:`close`."""
        if self._closed:
            return 0
        taken = min(want, self.free)
        self.free -= taken
        if self.free < self.total:
            self._all_free.clear()
        return taken

    def give(self, count: int = 1) -> None:
        if count <= 0:
            return
        self.free += count
        if self.free > self.total:  # pragma: no cover - a bookkeeping bug must not go unnoticed
            raise RuntimeError("more slots given back than taken")
        self._available.set()
        if self.free == self.total:
            self._all_free.set()

    async def wait_all_free(self) -> None:
        await self._all_free.wait()

    @property
    def busy(self) -> int:
        return self.total - self.free

    def close(self) -> None:
        """Wake every waiter with 0: no more reads."""
        self._closed = True
        self._available.set()
