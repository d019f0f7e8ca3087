"""The ``device_actions`` jobs: make one customer's router agree with the desired state (``service.activate`` /
``service.deactivate``), read it (``service.refresh``), or test a device (``device.test``).

Level-triggered convergence (the message carries an event; the row carries the truth):

1. **Record** the event in its own short transaction, committed before any device call (``desired.record_desired``:
   an older event than the newest accepted one is refused as stale; a change bumps ``desired_generation``).
2. **Converge** without a database transaction open: take the service lock and a device slot as session advisory
   locks on the job's own connection (``locks.py``); read the desired state *and its generation* from the row;
   look up, change and verify the router (every write preceded and followed by a lock check); record
   ``applied_generation = N`` (with ``applied_at`` = the verify's time) only if the desired generation is still N,
   else go round again with the newer one.

Four exits (one place, ``handle``): done; busy (service or device taken, device breaker open) -> retried later
without using an attempt; transient device error -> pg-worker's backoff; permanent -> dead letter, recorded.

A job that loses its locks mid-write (its connection died) stops, and its retry converges against the newest
desired state: a write that landed after another job's verify is undone then. A redelivered job always converges,
even when its own event has been overtaken since, for that reason.

Per-device circuit breaker (columns ``breaker_*`` of ``wl.devices``): after ``WL_BREAKER_THRESHOLD`` consecutive
transient failures, one job at a time probes the device every ``WL_BREAKER_PROBE_INTERVAL`` seconds; the others
park (``wl.parked_actions``, retried after ``WL_PARK_DELAY`` without using an attempt); the first success on the
device wakes every parked job at once (``pgmq.set_vt(..., 0)`` and a NOTIFY to the idle workers).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import UTC, datetime
from typing import Any, Literal, NoReturn

import psycopg
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from pg_worker import Job, PermanentFailure, RetryLater

from . import _sql, history
from ._store import (
    Device,
    NotFound,
    SecretUnavailable,
    Service,
    State,
    get_device,
    get_device_by_id,
    get_service,
    resolve_password,
)
from .desired import record_desired
from .drivers import DeviceError, PermanentDeviceError, RouterOs, Timeouts, TransientDeviceError, make_driver
from .locks import LockLost, SessionLocks
from .metrics import ACTIONS, FAILURES, LATENCY, LOCKS_LOST
from .settings import WlSettings

logger = logging.getLogger(__name__)

ACTIVATE, DEACTIVATE = "service.activate", "service.deactivate"
REFRESH, DEVICE_TEST = "service.refresh", "device.test"
TARGET_STATE: dict[str, State] = {ACTIVATE: "active", DEACTIVATE: "suspended"}
CONVERGE_ROUNDS = 5  # the desired state moved under us this many times in one job: let the retry go on


class _Message(BaseModel):
    """What every ``device_actions`` message may carry besides its type: who asked (recorded in the history)."""

    model_config = ConfigDict(extra="ignore")

    source: str | None = Field(default=None, max_length=50)
    actor: str | None = Field(default=None, max_length=200)


class ServiceAction(_Message):
    """A ``device_actions`` message that sets the desired state (the contract in CONTRACT.md)."""

    type: Literal["service.activate", "service.deactivate"]
    service_id: str = Field(min_length=1, max_length=200)
    event_at: AwareDatetime
    reason: str = Field(default="", max_length=1000)
    event_id: str | None = Field(default=None, max_length=200)
    provider: str | None = Field(default=None, max_length=50)
    payment_id: str | None = Field(default=None, max_length=200)


class ServiceRefresh(_Message):
    type: Literal["service.refresh"]
    service_id: str = Field(min_length=1, max_length=200)


class DeviceTest(_Message):
    type: Literal["device.test"]
    device: str = Field(min_length=1, max_length=63)
    request_id: str = Field(min_length=1, max_length=200)


def action_message(action: str, service_id: str, event_at: datetime, reason: str, **fields: Any) -> dict[str, Any]:
    """A ``service.activate``/``deactivate`` message; ``fields``: source, actor, event_id, provider, payment_id."""
    message = ServiceAction(type=action, service_id=service_id, event_at=event_at, reason=reason, **fields)  # type: ignore[arg-type]
    return message.model_dump(mode="json", exclude_none=True)


def defer(delay: float, reason: str) -> RetryLater:
    """A retry that uses no attempt: busy (service, device, breaker open, lock lost) is not failure, and is never
    dead-lettered."""
    return RetryLater(delay, reason, count_attempt=False)


class DeviceActions:
    """The handler of every ``device_actions`` type. One database connection per job, in autocommit: it holds
    the job's session locks and never a transaction across a router call."""

    def __init__(self, conninfo: str, settings: WlSettings) -> None:
        self.conninfo = conninfo
        self.settings = settings
        self.timeouts = Timeouts(connect=settings.http_connect_timeout, read=settings.http_read_timeout)
        self._waiters = asyncio.Semaphore(settings.device_waiters)

    async def _connect(self, what: str) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, connect_timeout=10, application_name=f"wl-workers {what}"[:63])

    def _busy_delay(self) -> float:
        return self.settings.busy_retry_delay * (0.5 + random.random())

    # -- service.activate / service.deactivate ---------------------------------------------------------------

    async def handle(self, job: Job[ServiceAction]) -> None:
        action = job.payload
        state = TARGET_STATE[action.type]
        event_id = history.event_key(action.event_id, job.msg_id)
        ctx: dict[str, Any] = {"service_id": action.service_id, "action": action.type, "event_at": action.event_at.isoformat(), "attempt": job.attempt, "msg_id": job.msg_id, "device": "-"}
        origin = {"source": action.source or "worker", "actor": action.actor, "event_id": event_id, "payment_id": action.payment_id}
        async with await self._connect(f"job {job.msg_id}") as conn:
            await conn.execute(_sql.UNPARK_ACTION, (job.msg_id,))
            if not await self._accept(conn, action, state, event_id, ctx):
                return
            await self._converge(conn, job, action.service_id, ctx, origin)

    async def _accept(self, conn: psycopg.AsyncConnection[Any], action: ServiceAction, state: State, event_id: str | None, ctx: dict[str, Any]) -> bool:
        """Record the event (first delivery). ``False``: stale, nothing to do. A redelivery converges whatever
        happened since: its first delivery may have written to the router before it lost its locks."""
        cur = await conn.execute(_sql.EVENT_SEEN, {"service_id": action.service_id, "event_id": event_id})
        row = await cur.fetchone()
        if row is not None and row[0]:
            return True
        try:
            result = await record_desired(
                conn, action.service_id, state, event_at=action.event_at, source=action.source or "worker", actor=action.actor,
                reason=action.reason or None, event_id=event_id, payment_id=action.payment_id,
            )  # fmt: skip
        except NotFound as exc:
            logger.warning("unknown_service", extra={"event": "unknown_service", **ctx})
            ACTIONS.labels("-", action.type, "permanent").inc()
            raise PermanentFailure(str(exc)) from exc
        if not result.accepted:
            ctx["device"] = (await get_service(conn, action.service_id)).device
            ACTIONS.labels(ctx["device"], action.type, "stale").inc()
            logger.info("action_stale", extra={"event": "action_stale", **ctx})
            return False
        if result.changed:
            logger.info("desired_changed", extra={"event": "desired_changed", **ctx, "state": state, "generation": result.generation})
        return True

    async def _converge(self, conn: psycopg.AsyncConnection[Any], job: Job[Any], service_id: str, ctx: dict[str, Any], origin: dict[str, Any]) -> None:
        locks = SessionLocks(conn)
        try:
            if not await locks.try_service(service_id):
                ACTIONS.labels(ctx["device"], ctx["action"], "busy").inc()
                logger.info("service_busy", extra={"event": "service_busy", **ctx})
                raise defer(self._busy_delay(), f"service {service_id} is busy with another job")
            service = await self._service(conn, service_id, ctx)
            device = await get_device_by_id(conn, service.device_id)
            ctx["device"] = device.name
            probing = await self._breaker_gate(conn, device, job, ctx)
            await self._take_slot(conn, locks, device, job, ctx)
            await self._rounds(conn, locks, job, device, service, ctx, origin, probing)
        except (LockLost, psycopg.OperationalError) as exc:
            if not locks.held and not isinstance(exc, LockLost):
                raise  # the connection died before this job held anything: an ordinary failure, retried
            await self._lock_lost(exc, ctx, origin)
            raise defer(min(self._busy_delay(), 1.0), f"locks lost: {exc}") from exc
        finally:
            await self._release(conn, locks)

    async def _take_slot(self, conn: psycopg.AsyncConnection[Any], locks: SessionLocks, device: Device, job: Job[Any], ctx: dict[str, Any]) -> None:
        """A device slot, or the job parks and waits its turn (raises): it frees its worker place for jobs of
        other routers, and the job that frees a slot wakes the oldest parked one. Parking then trying once more
        closes the gap where the last slot-holder finished just before this job parked."""
        if await locks.try_device_slot(device):
            return
        if not self._waiters.locked():  # a few worker places per process may wait; the rest stay for other routers
            async with self._waiters:
                if await locks.wait_for_device_slot(device, self.settings.device_wait):
                    return
        cur = await conn.execute(_sql.PARK_BUSY, {"msg_id": job.msg_id, "device_id": device.id})
        row = await cur.fetchone()
        ahead = int(row[0]) if row else 0
        if await locks.try_device_slot(device):
            await conn.execute(_sql.UNPARK_ACTION, (job.msg_id,))
            return
        ACTIONS.labels(device.name, ctx["action"], "busy").inc()
        logger.info("device_busy", extra={"event": "device_busy", **ctx, "waiting": ahead})
        # woken when its turn comes; this retry only covers a wake that got lost (a slot-holder that died)
        # (generous: a second per action per slot; a parked job that comes back before its turn only parks again)
        delay = min(self.settings.park_delay, self.settings.busy_retry_delay + ahead / device.max_concurrent) * (0.75 + random.random() / 2)
        raise defer(delay, f"all {device.max_concurrent} slots of device {device.name} are busy ({ahead} waiting)")

    async def _release(self, conn: psycopg.AsyncConnection[Any], locks: SessionLocks) -> None:
        """Release the locks; a freed device slot wakes the oldest job parked on that device."""
        device_id = locks.device_id
        await locks.release()
        if device_id is None or conn.closed:
            return
        try:
            cur = await conn.execute(_sql.WAKE_NEXT, {"device_id": device_id, "n": 1})
            row = await cur.fetchone()
            if row is not None and row[0]:
                await conn.execute(_sql.NOTIFY_ACTIONS)
        except psycopg.Error as exc:  # the parked job's own retry comes anyway
            logger.warning("wake_failed", extra={"event": "wake_failed", "error": str(exc)})

    async def _service(self, conn: psycopg.AsyncConnection[Any], service_id: str, ctx: dict[str, Any]) -> Service:
        try:
            return await get_service(conn, service_id)
        except NotFound as exc:
            logger.warning("unknown_service", extra={"event": "unknown_service", **ctx})
            ACTIONS.labels("-", ctx["action"], "permanent").inc()
            raise PermanentFailure(str(exc)) from exc

    async def _rounds(
        self, conn: psycopg.AsyncConnection[Any], locks: SessionLocks, job: Job[Any], device: Device, service: Service, ctx: dict[str, Any], origin: dict[str, Any], probing: bool
    ) -> None:
        for _ in range(CONVERGE_ROUNDS):
            cur = await conn.execute(_sql.DESIRED_OF, (service.service_id,))
            row = await cur.fetchone()
            if row is None:
                raise PermanentFailure(f"customer service {service.service_id!r} was removed")
            desired: State = row[0]
            generation = int(row[1])
            await locks.check()
            started = time.monotonic()
            try:
                writes = await self._drive(device, service, desired, locks.check)
            except DeviceError as exc:
                await self._failed(conn, job, device, service, desired, exc, time.monotonic() - started, ctx, origin, probing)
            duration = time.monotonic() - started
            LATENCY.labels(device.name).observe(duration)
            verified_at = datetime.now(UTC)
            await locks.check()  # the verify counts only if nobody else could have written since
            cur = await conn.execute(_sql.RECORD_CONVERGED, {"service_id": service.service_id, "state": desired, "generation": generation, "verified_at": verified_at})
            converged = await cur.fetchone() is not None
            outcome = "applied" if writes else "unchanged"
            await history.record(
                conn, service.service_id, "router_action", state=desired, outcome=outcome, duration_ms=round(duration * 1000, 1),
                detail={"generation": generation, "writes": writes, "device": device.name, "recorded": converged}, **origin,
            )  # fmt: skip
            await self._device_ok(conn, device, ctx)
            if converged:
                ACTIONS.labels(device.name, ctx["action"], "applied").inc()
                logger.info("action_applied", extra={"event": "action_applied", **ctx, "method": service.method, "state": desired, "generation": generation, "writes": writes, "duration_s": round(duration, 3)})
                return
            logger.info("desired_moved", extra={"event": "desired_moved", **ctx, "generation": generation})
        raise defer(self._busy_delay(), f"the desired state of {service.service_id} changed {CONVERGE_ROUNDS} times during one job")

    async def _drive(self, device: Device, service: Service, desired: State, guard: Any) -> int:
        """Change and verify the router; how many writes it took. Device errors come out classified."""
        driver = await self._driver(device, guard=guard)
        try:
            if desired == "active":
                await driver.ensure_active(service.method, service.target)
            else:
                await driver.ensure_suspended(service.method, service.target)
        finally:
            await driver.aclose()
        return driver.writes

    async def _failed(
        self, conn: psycopg.AsyncConnection[Any], job: Job[Any], device: Device, service: Service, desired: State, exc: DeviceError,
        duration: float, ctx: dict[str, Any], origin: dict[str, Any], probing: bool,
    ) -> NoReturn:  # fmt: skip
        """Record and count a device error, then raise what pg-worker should do with the job."""
        LATENCY.labels(device.name).observe(duration)
        FAILURES.labels(device.name, exc.kind).inc()
        ACTIONS.labels(device.name, ctx["action"], exc.kind).inc()
        error = f"{exc.kind}: {exc.reason}"[:2000]
        level = logging.WARNING if exc.kind == "transient" else logging.ERROR
        logger.log(level, "action_failed", extra={"event": "action_failed", **ctx, "error_class": exc.kind, "error": exc.reason, "duration_s": round(duration, 3)})
        await conn.execute(_sql.RECORD_ERROR, {"service_id": service.service_id, "error": error})
        failures = await self._device_failed(conn, device, exc)
        await history.record(
            conn, service.service_id, "router_action", state=desired, outcome="error", error_class=exc.kind,
            duration_ms=round(duration * 1000, 1), detail={"device": device.name, "error": exc.reason[:500]}, **origin,
        )  # fmt: skip
        if isinstance(exc, PermanentDeviceError):
            await history.record(conn, service.service_id, "dead_letter", state=desired, outcome="dead_letter", error_class=exc.kind, reason=exc.reason[:500], **{k: v for k, v in origin.items() if k != "reason"})
            raise PermanentFailure(f"device {device.name}: {exc.reason}") from exc
        if failures >= self.settings.breaker_threshold:
            # the breaker is open: no attempt used; this job probes again at the next interval (or is parked)
            if not probing and failures == self.settings.breaker_threshold:
                logger.warning("device_breaker_open", extra={"event": "device_breaker_open", "device": device.name, "failures": failures, "error": exc.reason})
            raise defer(self.settings.breaker_probe_interval, f"device {device.name} is failing ({failures} in a row): {exc.reason}") from exc
        if job.attempt >= self.settings.action_max_attempts:
            await history.record(conn, service.service_id, "dead_letter", state=desired, outcome="dead_letter", error_class=exc.kind, reason=exc.reason[:500], **{k: v for k, v in origin.items() if k != "reason"})
        raise TransientDeviceError(f"device {device.name}: {exc.reason}") from exc

    # -- device health ---------------------------------------------------------------------------------------

    async def _device_failed(self, conn: psycopg.AsyncConnection[Any], device: Device, exc: DeviceError) -> int:
        params = {
            "device_id": device.id, "transient": exc.kind == "transient", "threshold": self.settings.breaker_threshold,
            "probe_interval": self.settings.breaker_probe_interval, "error": f"{exc.kind}: {exc.reason}"[:2000],
        }  # fmt: skip
        cur = await conn.execute(_sql.DEVICE_FAILED, params)
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _device_ok(self, conn: psycopg.AsyncConnection[Any], device: Device, ctx: dict[str, Any]) -> None:
        """The device answered: close its breaker, and wake every job parked on it (now, not at their retry)."""
        cur = await conn.execute(_sql.DEVICE_OK, {"device_id": device.id})
        row = await cur.fetchone()
        if row is None or int(row[0]) < self.settings.breaker_threshold:
            return
        logger.info("device_breaker_closed", extra={"event": "device_breaker_closed", "device": device.name, "failures": int(row[0])})
        cur = await conn.execute(_sql.WAKE_NEXT, {"device_id": device.id, "n": _sql.WAKE_ALL})
        row = await cur.fetchone()
        woken = int(row[0]) if row else 0
        if woken:
            await conn.execute(_sql.NOTIFY_ACTIONS)
            logger.info("device_parked_woken", extra={"event": "device_parked_woken", "device": device.name, "woken": woken, "msg_id": ctx.get("msg_id")})

    async def _breaker_gate(self, conn: psycopg.AsyncConnection[Any], device: Device, job: Job[Any], ctx: dict[str, Any]) -> bool:
        """``True``: the breaker is open and this job is its one probe. Parks the job (raises) when the breaker is
        open and another job probes; ``False``: closed, go on."""
        cur = await conn.execute(_sql.DEVICE_BREAKER, (device.id,))
        row = await cur.fetchone()
        if row is None or int(row[0]) < self.settings.breaker_threshold:
            return False
        cur = await conn.execute(_sql.TAKE_PROBE, {"device_id": device.id, "threshold": self.settings.breaker_threshold, "probe_interval": self.settings.breaker_probe_interval})
        if await cur.fetchone() is not None:
            logger.info("device_probe", extra={"event": "device_probe", **ctx})
            return True
        await conn.execute(_sql.PARK_ACTION, (job.msg_id, device.id))
        cur = await conn.execute(_sql.DEVICE_BREAKER, (device.id,))
        row = await cur.fetchone()
        if row is None or int(row[0]) < self.settings.breaker_threshold:  # closed meanwhile: do not sleep through it
            await conn.execute(_sql.UNPARK_ACTION, (job.msg_id,))
            raise defer(0.0, f"device {device.name} recovered while this job parked")
        ACTIONS.labels(device.name, ctx["action"], "parked").inc()
        logger.info("action_parked", extra={"event": "action_parked", **ctx})
        raise defer(self.settings.park_delay, f"device {device.name} is failing; parked until it answers again")

    async def _lock_lost(self, exc: Exception, ctx: dict[str, Any], origin: dict[str, Any]) -> None:
        """Make a lost lock visible: ERROR log, metric, and a history row (through a fresh connection, if the
        database is reachable at all)."""
        LOCKS_LOST.labels(ctx["device"]).inc()
        logger.error("lock_lost", extra={"event": "lock_lost", **ctx, "error": str(exc)})
        try:
            async with await self._connect("lock-lost") as conn:
                await history.record(conn, ctx["service_id"], "router_action", outcome="lock_lost", error_class="lock_lost", detail={"device": ctx["device"], "error": str(exc)[:500]}, **origin)
        except psycopg.Error as db_exc:
            logger.warning("history_write_failed", extra={"event": "history_write_failed", **ctx, "error": str(db_exc)})

    # -- service.refresh ---------------------------------------------------------------------------------------

    async def refresh(self, job: Job[ServiceRefresh]) -> None:
        """Read the router for one service (within the device's limit) and record what it shows."""
        msg = job.payload
        ctx: dict[str, Any] = {"service_id": msg.service_id, "action": REFRESH, "msg_id": job.msg_id, "device": "-"}
        origin = {"source": msg.source or "worker", "actor": msg.actor}
        async with await self._connect(f"refresh {job.msg_id}") as conn:
            service = await self._service(conn, msg.service_id, ctx)
            device = await get_device_by_id(conn, service.device_id)
            ctx["device"] = device.name
            locks = SessionLocks(conn)
            try:
                if not await locks.try_device_slot(device):
                    raise defer(self._busy_delay(), f"all {device.max_concurrent} slots of device {device.name} are busy")
                started = time.monotonic()
                try:
                    driver = await self._driver(device)
                    try:
                        observed = await driver.read_state(service.method, service.target)
                    finally:
                        await driver.aclose()
                except DeviceError as exc:
                    await self._device_failed(conn, device, exc)
                    FAILURES.labels(device.name, exc.kind).inc()
                    await conn.execute(_sql.RECORD_OBSERVED, {"service_id": service.service_id, "observed": "unknown", "at": datetime.now(UTC)})
                    await history.record(conn, service.service_id, "router_read", outcome="error", error_class=exc.kind, duration_ms=round((time.monotonic() - started) * 1000, 1), detail={"device": device.name, "error": exc.reason[:500]}, **origin)
                    logger.warning("refresh_failed", extra={"event": "refresh_failed", **ctx, "error_class": exc.kind, "error": exc.reason})
                    return  # recorded for whoever asked; a read is not worth a retry
                state = observed.state if observed.state in ("active", "suspended") else "unknown"
                await conn.execute(_sql.RECORD_OBSERVED, {"service_id": service.service_id, "observed": state, "at": datetime.now(UTC)})
                await history.record(conn, service.service_id, "router_read", state=state, outcome="read", duration_ms=round((time.monotonic() - started) * 1000, 1), detail={"device": device.name, "detail": observed.detail, "foreign": observed.foreign}, **origin)
                await self._device_ok(conn, device, ctx)
            finally:
                await self._release(conn, locks)

    async def _driver(self, device: Device, *, guard: Any = None) -> RouterOs:
        """The device's driver (its password resolved); a password that cannot be read is a permanent error."""
        try:
            password = resolve_password(device.password_ref)
        except SecretUnavailable as exc:
            raise PermanentDeviceError(f"password of device {device.name} unavailable: {exc}") from exc
        return make_driver(device, password, self.timeouts, guard=guard)

    # -- device.test -------------------------------------------------------------------------------------------

    async def device_test(self, job: Job[DeviceTest]) -> None:
        """Connect, log in and read the device's address-list; the result goes to ``wl.device_tests``."""
        msg = job.payload
        async with await self._connect(f"device-test {job.msg_id}") as conn:
            try:
                device = await get_device(conn, msg.device)
            except NotFound as exc:
                await conn.execute(_sql.RECORD_DEVICE_TEST, {"request_id": msg.request_id, "device": msg.device, "ok": False, "message": str(exc)})
                return
            locks = SessionLocks(conn)
            try:
                if not await locks.try_device_slot(device):
                    raise defer(self._busy_delay(), f"all {device.max_concurrent} slots of device {device.name} are busy")
                started = time.monotonic()
                try:
                    driver = await self._driver(device)
                    try:
                        entries = await driver.api.print("ip/firewall/address-list", list=device.address_list)
                    finally:
                        await driver.aclose()
                except DeviceError as exc:
                    await self._device_failed(conn, device, exc)
                    message, ok = f"{exc.kind}: {exc.reason}", False
                else:
                    await self._device_ok(conn, device, {"msg_id": job.msg_id})
                    message, ok = f"logged in as {device.username}; address-list {device.address_list} has {len(entries)} entries ({time.monotonic() - started:.2f}s)", True
                await conn.execute(_sql.RECORD_DEVICE_TEST, {"request_id": msg.request_id, "device": device.name, "ok": ok, "message": message[:2000]})
                logger.info("device_tested", extra={"event": "device_tested", "device": device.name, "ok": ok, "request_id": msg.request_id, "error": None if ok else message})
            finally:
                await self._release(conn, locks)
