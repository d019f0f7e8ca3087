"""Reconcile: read every device, compare each customer with its desired state, enqueue what differs.

Each device is read on its own (a bounded number at once, ``WL_RECONCILE_CONCURRENCY``), within a device slot
(the per-device limit covers reads too) and a total time budget (``WL_RECONCILE_DEVICE_BUDGET``), in at most four
requests whatever its number of customers (``RouterOs.snapshot``). Whatever goes wrong with one device (an
unreadable CA file, a refused login, an HTML answer, a hung router, a bug) is reported for that device — in the
report, the metrics (``wl_reconcile_devices_total{result}``) and the logs — and every other device is reconciled.

The repair goes through the normal ``device_actions`` path (locks, verify, metrics). Its ``event_at`` is the
business time of the event that set the desired state (the epoch when there was none), so a repair never
outranks a newer business event. A customer blocked only by an entry this system did not create (the device
keeps ``own_entries_only``) is listed as a difference that reconcile will not fix.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from pg_worker import AsyncProducer

from . import _sql, history
from ._store import Device, Service, list_devices, list_services, resolve_password
from .actions import ACTIVATE, DEACTIVATE, action_message
from .drivers import DeviceError, PermanentDeviceError, Timeouts, make_driver
from .locks import SessionLocks
from .metrics import DIVERGED, RECONCILE, RECONCILE_DEVICES
from .settings import DEVICE_ACTIONS, WlSettings

logger = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Difference:
    service_id: str
    device: str
    desired: str
    observed: str
    detail: str
    action: str
    event_at: datetime
    fixable: bool = True  # False: blocked by an entry we did not create (own_entries_only): not enqueued


@dataclass
class ReconcileReport:
    checked: int = 0
    differences: list[Difference] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (device or service, reason)
    enqueued: list[int] = field(default_factory=list)
    failed_devices: dict[str, str] = field(default_factory=dict)  # device -> why it could not be read


async def reconcile(conninfo: str, settings: WlSettings | None = None, *, dry_run: bool = False) -> ReconcileReport:
    settings = settings or WlSettings()
    report = ReconcileReport()
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        devices = await list_devices(conn)
        services: dict[str, list[Service]] = {d.name: [] for d in devices}
        for service in await list_services(conn):  # one query, not one per device; ordered by device, service id
            services.setdefault(service.device, []).append(service)
    bound = asyncio.Semaphore(settings.reconcile_concurrency)

    async def one(device: Device) -> None:
        async with bound:
            await _reconcile_device(conninfo, settings, device, services[device.name], report)

    await asyncio.gather(*(one(d) for d in devices if services[d.name]))
    fixable = [d for d in report.differences if d.fixable]
    if not dry_run and fixable:
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            await _enqueue(conn, report, fixable)
    return report


async def _reconcile_device(conninfo: str, settings: WlSettings, device: Device, services: list[Service], report: ReconcileReport) -> None:
    """One device, isolated: every failure ends here, named and counted."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(settings.reconcile_device_budget):
            observed = await _read_device(conninfo, settings, device, services)
    except TimeoutError:
        _device_failed(report, device, services, "timeout", f"not read within its budget of {settings.reconcile_device_budget:g}s")
        return
    except DeviceError as exc:
        _device_failed(report, device, services, "failed", f"{exc.kind}: {exc.reason}")
        return
    except Exception as exc:  # a bug or an unexpected answer must not cost the other devices their pass
        logger.exception("reconcile_device_crashed", extra={"event": "reconcile_device_crashed", "device": device.name})
        _device_failed(report, device, services, "failed", f"{type(exc).__name__}: {exc}")
        return
    RECONCILE_DEVICES.labels(device.name, "ok").inc()
    for service, state in observed:
        report.checked += 1
        if isinstance(state, DeviceError):
            report.errors.append((service.service_id, f"{state.kind}: {state.reason}"))
            RECONCILE.labels(device.name, "error").inc()
            logger.warning("reconcile_read_failed", extra={"event": "reconcile_read_failed", "device": device.name, "service_id": service.service_id, "error": state.reason})
            continue
        if state.state == service.desired_state:
            RECONCILE.labels(device.name, "in_sync").inc()
            continue
        fixable = not (state.foreign and device.own_entries_only and service.desired_state == "active")
        RECONCILE.labels(device.name, "differs" if fixable else "foreign").inc()
        action = ACTIVATE if service.desired_state == "active" else DEACTIVATE
        report.differences.append(
            Difference(service.service_id, device.name, service.desired_state, state.state, state.detail, action, service.desired_event_at or EPOCH, fixable)
        )
        if not fixable:
            logger.warning("reconcile_foreign_entry", extra={"event": "reconcile_foreign_entry", "device": device.name, "service_id": service.service_id, "detail": state.detail})
    logger.info("reconcile_device_done", extra={"event": "reconcile_device_done", "device": device.name, "services": len(services), "duration_s": round(time.monotonic() - started, 3)})


def _device_failed(report: ReconcileReport, device: Device, services: list[Service], result: str, reason: str) -> None:
    report.failed_devices[device.name] = reason
    report.errors.append((device.name, reason))
    RECONCILE_DEVICES.labels(device.name, result).inc()
    RECONCILE.labels(device.name, "error").inc(len(services))
    logger.error("reconcile_device_failed", extra={"event": "reconcile_device_failed", "device": device.name, "error": reason, "services": len(services)})


async def _read_device(conninfo: str, settings: WlSettings, device: Device, services: list[Service]) -> list[tuple[Service, Any]]:
    """Every service's state on the device, read in one snapshot within one of the device's slots (waited for)."""
    try:
        password = resolve_password(device.password_ref)
    except Exception as exc:
        raise PermanentDeviceError(f"password unavailable: {exc}") from exc
    timeouts = Timeouts(connect=settings.http_connect_timeout, read=settings.http_read_timeout)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10, application_name="wl-workers reconcile") as conn:
        locks = SessionLocks(conn)
        try:
            # wait for a slot: a pass is background work, its budget bounds the wait
            slot = await locks.try_device_slot(device)
            while not slot:
                await asyncio.sleep(0.05 + random.random() * 0.1)
                slot = await locks.try_device_slot(device)
            driver = make_driver(device, password, timeouts)
            try:
                snap = await driver.snapshot({s.method for s in services})
            finally:
                await driver.aclose()
        finally:
            await locks.release()
        results: list[tuple[Service, Any]] = []
        for service in services:
            try:
                results.append((service, driver.state_in(snap, service.method, service.target)))
            except DeviceError as exc:
                results.append((service, exc))
        now = datetime.now(UTC)
        observed = [(s.service_id, st.state if not isinstance(st, DeviceError) and st.state in ("active", "suspended") else "unknown") for s, st in results]
        await conn.execute(_sql.RECORD_OBSERVED_MANY, {"ids": [o[0] for o in observed], "states": [o[1] for o in observed], "at": now})
    return results


async def _enqueue(conn: psycopg.AsyncConnection[Any], report: ReconcileReport, differences: list[Difference]) -> None:
    producer = AsyncProducer()
    async with conn.transaction():
        for diff in differences:
            reason = f"reconcile: device says {diff.observed}, desired {diff.desired}"
            message = action_message(diff.action, diff.service_id, diff.event_at, reason, source="reconcile", actor="wl-workers")
            msg_id = await producer.enqueue(DEVICE_ACTIONS, message, conn=conn)
            report.enqueued.append(msg_id)
            logger.info("reconcile_enqueued", extra={"event": "reconcile_enqueued", "device": diff.device, "service_id": diff.service_id, "action": diff.action, "msg_id": msg_id})


async def reconcile_once_exclusive(conninfo: str, settings: WlSettings) -> ReconcileReport | None:
    """One reconcile pass unless another process is running one (then ``None``): the periodic reconcile of
    several workers must not enqueue every repair several times."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10) as lock_conn:
        cur = await lock_conn.execute(_sql.TRY_RECONCILE_LOCK)
        row = await cur.fetchone()
        if row is None or not row[0]:
            return None
        try:
            report = await reconcile(conninfo, settings)
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
                pruned = await history.prune(conn, settings.history_retention_days)
            if pruned:
                logger.info("history_pruned", extra={"event": "history_pruned", "rows": pruned, "older_than_days": settings.history_retention_days})
            return report
        finally:
            await lock_conn.execute(_sql.RELEASE_RECONCILE_LOCK)


async def count_diverged(conninfo: str, settings: WlSettings) -> dict[str, int]:
    """Sets ``wl_services_diverged`` per device from the database (what the alert on diverged customers reads) and
    returns it. Read from the rows, not from this process's last pass: every worker reports the same figure."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        cur = await conn.execute(_sql.DIVERGED_BY_DEVICE, {"grace": settings.diverged_grace})
        counts = {str(name): int(n) for name, n in await cur.fetchall()}
    for device, n in counts.items():
        DIVERGED.labels(device).set(n)
    return counts
