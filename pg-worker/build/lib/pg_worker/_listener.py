"""The supervised LISTEN connection: one dedicated connection, reconnected with backoff and jitter."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from . import _sql
from ._events import WorkerObserver
from ._names import notify_channel

logger = logging.getLogger(__name__)

# TCP keepalives find a silently dead server (a cut VPN, a failed-over host) without any SQL, so an idle
# worker still issues no transactions. libpq ignores them on Unix sockets, where EOF is immediate anyway.
KEEPALIVE_KWARGS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


class Listener:
    """Keeps a LISTEN on the channels of ``queues`` and reports each notification's queue.

    ``on_connected(pid)`` runs after every successful (re)connection, once LISTEN is in place: the worker
    then drains every queue, catching up on what was sent while nobody listened.
    """

    def __init__(
        self,
        conninfo: str,
        queues: Iterable[str],
        *,
        on_notify: Callable[[str], None],
        on_connected: Callable[[int], None],
        observer: WorkerObserver,
        reconnect_max: float,
        degraded_poll_interval: float,
    ) -> None:
        self._conninfo = conninfo
        self._channels = {notify_channel(q): q for q in queues}
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._observer = observer
        self._reconnect_max = reconnect_max
        self._degraded_poll_interval = degraded_poll_interval
        self.connected = False
        self.pid: int | None = None
        self.first_attempt_done = asyncio.Event()

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._reconnect_max, 0.1 * 2.0 ** min(failures, 16))
        return float(ceiling * (0.5 + random.random() / 2))

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, **KEEPALIVE_KWARGS
                ) as conn:
                    for queue in self._channels.values():
                        await conn.execute(_sql.channel_listen(queue))
                    self.pid = conn.info.backend_pid
                    self.connected = True
                    failures = 0
                    self.first_attempt_done.set()
                    self._observer.listen_state(True)
                    logger.info("listen_connected", extra={"event": "listen_connected", "pid": self.pid, "queues": list(self._channels.values())})
                    self._on_connected(self.pid)
                    async for notify in conn.notifies():
                        target = self._channels.get(notify.channel)
                        if target is not None:
                            self._observer.notification(target)
                            self._on_notify(target)
            except (psycopg.Error, OSError) as exc:
                was_connected = self.connected
                self.connected = False
                self.first_attempt_done.set()
                delay = self._backoff(failures)
                failures += 1
                if was_connected:
                    self._observer.listen_state(False)
                    logger.warning(
                        "listen_lost",
                        extra={
                            "event": "listen_lost",
                            "error": f"{type(exc).__name__}: {exc}".strip(),
                            "polling_every_s": self._degraded_poll_interval,
                            "retry_in_s": round(delay, 3),
                        },
                    )
                else:
                    logger.warning(
                        "listen_connect_failed",
                        extra={
                            "event": "listen_connect_failed",
                            "error": f"{type(exc).__name__}: {exc}".strip(),
                            "attempt": failures,
                            "polling_every_s": self._degraded_poll_interval,
                            "retry_in_s": round(delay, 3),
                        },
                    )
                self._observer.db_error("listen", exc)
                await asyncio.sleep(delay)
            else:  # pragma: no cover - notifies() only ends when the connection does
                self.connected = False
