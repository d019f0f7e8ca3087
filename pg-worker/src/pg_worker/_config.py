"""Worker-wide settings, validated once at construction."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from ._schedule import PollSchedule


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker process.

    - ``concurrency``: jobs run at once by this worker, across all its queues. With sync handlers only, at most
      ``sync_threads`` (default ``min(concurrency, 32)``): a job is not read before a thread can run it.
    - ``listen``: wake on LISTEN/NOTIFY; ``False`` is the poll-only mode.
    - ``poll``: the fallback poll's timetable (default every 60 s). It is the only wakeup in poll-only
      mode and the safety net otherwise; shorter means less latency when notifications fail, more load.
    - ``degraded_poll_interval``: the poll interval while the LISTEN connection is down.
    - ``missed_wakeup_bound``: the longest a message can stay unnoticed when its producer raced with this
      worker going to sleep (the notification was skipped); see docs/wakeups.md.
    - ``shutdown_grace``: how long in-flight jobs may finish after SIGTERM before they are handed back.
    - ``listen_reconnect_max``: the cap of the LISTEN reconnect backoff.
    - ``auto_install``: at start-up, create missing queues and wakeup triggers instead of refusing to start.
    - ``synchronous_commit``: make the worker's own commits (leases, acknowledgements, retries) wait for the
      WAL flush. Off by default: a database crash can then lose the last fraction of a second of them, which
      only means those jobs run again (at-least-once), never that a job is lost.
    - ``statement_timeout``, ``tcp_user_timeout``, ``tcp_keepalive_idle``/``_interval``, ``pool_timeout``: bounds
      on every database connection and statement, so a dead network path cannot hang a worker forever.
    - ``stall_bound``: liveness fails when the lease keeper or the acknowledger has had work it could not
      finish for longer than this (a hung connection), so the orchestrator restarts the worker.
    """

    concurrency: int = 100
    listen: bool = True
    poll: PollSchedule = field(default_factory=PollSchedule)
    degraded_poll_interval: float = 5.0
    missed_wakeup_bound: float = 1.0
    shutdown_grace: float = 30.0
    listen_reconnect_max: float = 1.0
    db_retry_max: float = 1.0
    sync_threads: int | None = None
    auto_install: bool = True
    synchronous_commit: bool = False
    statement_timeout: float = 30.0
    tcp_user_timeout: float = 15.0
    tcp_keepalive_idle: float = 10.0
    tcp_keepalive_interval: float = 5.0
    pool_timeout: float = 5.0
    stall_bound: float = 60.0
    worker_id: str = field(default_factory=_default_worker_id)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        for name in (
            "degraded_poll_interval", "missed_wakeup_bound", "listen_reconnect_max", "db_retry_max", "statement_timeout",
            "tcp_user_timeout", "tcp_keepalive_idle", "tcp_keepalive_interval", "pool_timeout", "stall_bound",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.shutdown_grace < 0:
            raise ValueError("shutdown_grace must be >= 0")
        if self.sync_threads is not None and self.sync_threads < 1:
            raise ValueError("sync_threads must be >= 1")
        if not self.worker_id or len(self.worker_id) > 200:
            raise ValueError("worker_id must be 1-200 characters")

    @property
    def thread_pool_size(self) -> int:
        return self.sync_threads or min(self.concurrency, 32)
