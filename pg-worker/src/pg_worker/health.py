"""Liveness and readiness of a worker, as the health endpoints report them."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ._app import Readiness, WorkerFailure

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ._worker import Worker


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Report:
    ok: bool
    checks: list[Check]

    def as_dict(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "fail", "checks": [asdict(c) for c in self.checks]}


class HealthProbe:
    """``liveness()``: the event loop is turning and no background task died (cheap, no I/O).
    ``readiness()``: started and not stopping, the database reachable, LISTEN up (or only briefly down), and
    every readiness check the app registered passes. The database is probed actively (one ``SELECT 1``) only
    when neither the LISTEN connection nor a recent query already shows that it answers, so an idle worker
    under frequent probes stays off the database."""

    def __init__(self, worker: Worker, *, liveness_timeout: float = 30.0, listen_grace: float = 30.0, db_fresh: float = 30.0, check_timeout: float = 5.0) -> None:
        self.worker = worker
        self.liveness_timeout = liveness_timeout
        self.listen_grace = listen_grace
        self.db_fresh = db_fresh
        self.check_timeout = check_timeout
        self._last: dict[str, tuple[bool, str]] = {}  # each app check's last (ok, detail), to log changes

    def liveness(self) -> Report:
        health = self.worker.health
        stalled = time.monotonic() - health.last_tick
        checks = [
            Check("event_loop", stalled < self.liveness_timeout, f"last tick {stalled:.1f}s ago"),
            Check("tasks", health.crashed is None, health.crashed or "all running"),
            self._progress("lease_keeper", health.lease_keeper_stalled_since),
            self._progress("acknowledger", health.acknowledger_stalled_since),
            Check(
                "sync_handlers",
                health.stuck_sync_jobs == 0,
                f"{health.stuck_sync_jobs} sync handler(s) running past their job_timeout" if health.stuck_sync_jobs else "none stuck",
            ),
        ]
        return Report(all(c.ok for c in checks), checks)

    def _progress(self, name: str, stalled_since: float | None) -> Check:
        """A part with work it has not finished for longer than the worker's ``stall_bound`` (a hung
        connection) makes the worker not alive: a restart is the cure."""
        if stalled_since is None:
            return Check(name, True, "keeping up")
        stalled = time.monotonic() - stalled_since
        bound = self.worker.config.stall_bound
        return Check(name, stalled < bound, f"no progress for {stalled:.1f}s (bound {bound:g}s)")

    async def readiness(self) -> Report:
        health = self.worker.health
        checks = [
            Check("worker", health.started and not health.stopping, self._worker_state()),
            await self._database(),
            self._listen(),
        ]
        for name, check in self.worker.app.readiness_checks:
            checks.append(await self._custom(name, check))
        return Report(all(c.ok for c in checks), checks)

    def _worker_state(self) -> str:
        health, failure = self.worker.health, self.worker.failure
        if health.stopping:
            return "stopping" if failure is None else f"stopping: {failure}"[:300]
        return "running" if health.started else "starting"

    async def _database(self) -> Check:
        health = self.worker.health
        now = time.monotonic()
        # A LISTEN connection behind a dead route still looks up (nothing arrives to say otherwise): it only
        # vouches for the database while no statement has failed since the last one that worked.
        failing = health.last_db_error_at is not None and (health.last_db_ok is None or health.last_db_error_at > health.last_db_ok)
        if health.listening and not failing:
            return Check("database", True, "LISTEN connection up")
        if health.last_db_ok is not None and now - health.last_db_ok < self.db_fresh and (health.last_db_error_at is None or health.last_db_error_at < health.last_db_ok):
            return Check("database", True, f"last query {now - health.last_db_ok:.1f}s ago")
        try:
            await asyncio.wait_for(self.worker.ping_database(), timeout=self.check_timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"; its text is the detail
            return Check("database", False, f"{type(exc).__name__}: {exc}".strip()[:300])
        return Check("database", True, "answered SELECT 1")

    def _listen(self) -> Check:
        health = self.worker.health
        if health.listening is None:
            return Check("listen", True, "poll-only mode")
        if health.listening:
            return Check("listen", True, "connected")
        down = time.monotonic() - (health.listen_down_since or time.monotonic())
        return Check("listen", down < self.listen_grace, f"down for {down:.1f}s, polling meanwhile")

    async def _custom(self, name: str, check: Any) -> Check:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, timeout=self.check_timeout)
        except WorkerFailure as exc:
            reason = str(exc) or "WorkerFailure"
            self.worker.stop(failure=f"readiness check {name}: {reason}")
            return self._changed(Check(name, False, reason[:300]))
        except Exception as exc:  # noqa: BLE001 - a failing hook is a failed check, never a crashed probe
            return self._changed(Check(name, False, f"{type(exc).__name__}: {exc}".strip()[:300]))
        if isinstance(result, Readiness):
            ok, detail = result.ok, result.reason[:300] or ("ok" if result.ok else "failed")
        else:
            ok, detail = bool(result), "ok" if result else "failed"
        return self._changed(Check(name, ok, detail))

    def _changed(self, check: Check) -> Check:
        """Log an app check's result when it differs from the last one (a first result only when failing)."""
        state = (check.ok, check.detail)
        previous = self._last.get(check.name, (True, "ok"))
        self._last[check.name] = state
        if state != previous:
            logger.log(
                logging.INFO if check.ok else logging.WARNING,
                "readiness_changed",
                extra={"event": "readiness_changed", "check": check.name, "ok": check.ok, "reason": check.detail},
            )
        return check
