"""The ``device_actions`` jobs: switch one customer's service on (``service.activate``) or off
(``service.deactivate``) on its router.

Each job runs in one database transaction that holds, until it commits:

1. the service's advisory lock (``pg_advisory_xact_lock``, waited for at most ``WL_LOCK_WAIT`` seconds), so two
   actions on one service never run at once, in any process;
2. one of the device's ``max_concurrent`` slot locks (``pg_try_advisory_xact_lock(hash(device), slot)``), so at
   most that many actions talk to one router at once, across all worker processes.

Under the service lock, an action whose ``event_at`` is older than the newest event already accepted for the
service changes nothing: a stale suspension never undoes a newer payment. The locks live and die with the
transaction: a worker that crashes releases them with its connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import datetime
from typing import Any, Literal

import psycopg
import psycopg.errors
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from pg_worker import Job, PermanentFailure, RetryLater

from . import _sql
from ._store import Device, NotFound, SecretUnavailable, Service, State, get_device_by_id, get_service, resolve_password
from .drivers import DeviceError, PermanentDeviceError, Timeouts, TransientDeviceError, make_driver
from .metrics import ACTIONS, FAILURES, LATENCY
from .settings import WlSettings

logger = logging.getLogger(__name__)

ACTIVATE, DEACTIVATE = "service.activate", "service.deactivate"
TARGET_STATE: dict[str, State] = {ACTIVATE: "active", DEACTIVATE: "suspended"}


class ServiceAction(BaseModel):
    """A ``device_actions`` message (the contract in the common brief)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["service.activate", "service.deactivate"]
    service_id: str = Field(min_length=1, max_length=200)
    event_at: AwareDatetime
    reason: str = Field(default="", max_length=1000)


def action_message(action: str, service_id: str, event_at: datetime, reason: str) -> dict[str, Any]:
    message = ServiceAction(type=action, service_id=service_id, event_at=event_at, reason=reason)  # type: ignore[arg-type]
    return message.model_dump(mode="json")


class DeviceBusy(Exception):
    """No slot of the device came free within the wait."""


class DeviceActions:
    """The handler of both action types. One database connection per job: actions are few (an ISP's daily
    payments and suspensions) and each holds its locks for the length of a device call."""

    def __init__(self, conninfo: str, settings: WlSettings) -> None:
        self.conninfo = conninfo
        self.settings = settings
        self.timeouts = Timeouts(connect=settings.http_connect_timeout, read=settings.http_read_timeout)

    async def handle(self, job: Job[ServiceAction]) -> None:
        action = job.payload
        state = TARGET_STATE[action.type]
        context = {"service_id": action.service_id, "action": action.type, "event_at": action.event_at.isoformat(), "attempt": job.attempt, "msg_id": job.msg_id}
        failure: DeviceError | None = None
        device_name = "-"
        async with await psycopg.AsyncConnection.connect(self.conninfo, connect_timeout=10) as conn:
            try:
                async with conn.transaction():
                    await self._lock_service(conn, action.service_id)
                    service = await self._service(conn, action.service_id, context)
                    device = await get_device_by_id(conn, service.device_id)
                    device_name = context["device"] = device.name
                    if service.desired_event_at is not None and action.event_at < service.desired_event_at:
                        ACTIONS.labels(device.name, action.type, "stale").inc()
                        logger.info("action_stale", extra={"event": "action_stale", **context, "newest_event_at": service.desired_event_at.isoformat()})
                        return
                    params = {"service_id": service.service_id, "state": state, "event_at": action.event_at}
                    await conn.execute(_sql.ACCEPT_ACTION, params)
                    await self._take_device_slot(conn, device)
                    failure = await self._apply(device, service, state, context)
                    if failure is None:
                        await conn.execute(_sql.RECORD_APPLIED, params)
                    else:
                        await conn.execute(_sql.RECORD_ERROR, {"service_id": service.service_id, "error": f"{failure.kind}: {failure.reason}"[:2000]})
            except psycopg.errors.LockNotAvailable as exc:
                ACTIONS.labels(device_name, action.type, "busy").inc()
                logger.info("service_busy", extra={"event": "service_busy", **context})
                raise RetryLater(self._busy_delay(), f"service {action.service_id} is busy with another action") from exc
            except DeviceBusy as exc:
                ACTIONS.labels(device_name, action.type, "busy").inc()
                logger.info("device_busy", extra={"event": "device_busy", **context})
                raise RetryLater(self._busy_delay(), str(exc)) from exc
        if failure is not None:
            FAILURES.labels(device_name, failure.kind).inc()
            ACTIONS.labels(device_name, action.type, failure.kind).inc()
            if isinstance(failure, PermanentDeviceError):
                raise PermanentFailure(f"device {device_name}: {failure.reason}") from failure
            raise failure  # transient: pg-worker retries with the queue's backoff
        ACTIONS.labels(device_name, action.type, "applied").inc()

    def _busy_delay(self) -> float:
        return self.settings.busy_retry_delay * (0.5 + random.random())

    async def _lock_service(self, conn: psycopg.AsyncConnection[Any], service_id: str) -> None:
        await conn.execute(_sql.SET_LOCK_TIMEOUT, (f"{int(self.settings.lock_wait * 1000)}ms",))
        await conn.execute(_sql.LOCK_SERVICE_XACT, (service_id,))
        await conn.execute(_sql.SET_LOCK_TIMEOUT, ("0",))

    async def _service(self, conn: psycopg.AsyncConnection[Any], service_id: str, context: dict[str, Any]) -> Service:
        try:
            return await get_service(conn, service_id)
        except NotFound as exc:
            logger.warning("unknown_service", extra={"event": "unknown_service", **context})
            ACTIONS.labels("-", context["action"], "permanent").inc()
            raise PermanentFailure(str(exc)) from exc

    async def _take_device_slot(self, conn: psycopg.AsyncConnection[Any], device: Device) -> None:
        deadline = time.monotonic() + self.settings.lock_wait
        first = random.randrange(device.max_concurrent)  # spread the tries over the slots
        while True:
            for i in range(device.max_concurrent):
                slot = (first + i) % device.max_concurrent
                cur = await conn.execute(_sql.TRY_DEVICE_SLOT, (device.name, slot))
                row = await cur.fetchone()
                if row is not None and row[0]:
                    return
            if time.monotonic() >= deadline:
                raise DeviceBusy(f"all {device.max_concurrent} slots of device {device.name} stayed busy for {self.settings.lock_wait:g}s")
            await asyncio.sleep(0.05 + random.random() * 0.1)

    async def _apply(self, device: Device, service: Service, state: State, context: dict[str, Any]) -> DeviceError | None:
        started = time.monotonic()
        try:
            password = resolve_password(device.password_ref)
        except SecretUnavailable as exc:
            failure: DeviceError = PermanentDeviceError(f"password of device {device.name} unavailable: {exc}")
            logger.error("action_failed", extra={"event": "action_failed", **context, "error_class": failure.kind, "error": failure.reason})
            return failure
        try:
            driver = make_driver(device, password, self.timeouts)
            try:
                if state == "active":
                    await driver.ensure_active(service.method, service.target)
                else:
                    await driver.ensure_suspended(service.method, service.target)
            finally:
                await driver.aclose()
        except (TransientDeviceError, PermanentDeviceError) as exc:
            duration = time.monotonic() - started
            LATENCY.labels(device.name).observe(duration)
            level = logging.WARNING if exc.kind == "transient" else logging.ERROR
            logger.log(level, "action_failed", extra={"event": "action_failed", **context, "error_class": exc.kind, "error": exc.reason, "duration_s": round(duration, 3)})
            return exc
        duration = time.monotonic() - started
        LATENCY.labels(device.name).observe(duration)
        logger.info("action_applied", extra={"event": "action_applied", **context, "method": service.method, "state": state, "duration_s": round(duration, 3)})
        return None
