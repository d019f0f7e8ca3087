"""Reconcile: read every device, compare each customer with its desired state, enqueue what differs.

The repair goes through the normal ``device_actions`` path (locks, verify, metrics). Its ``event_at`` is the
business time of the event that set the desired state (the epoch when there was none), so a repair never
outranks a newer business event: if one arrives meanwhile, the repair is stale and changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from pg_worker import AsyncProducer

from . import _sql
from ._store import SecretUnavailable, list_devices, list_services, resolve_password
from .actions import ACTIVATE, DEACTIVATE, action_message
from .drivers import DeviceError, Timeouts, make_driver
from .metrics import RECONCILE
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


@dataclass
class ReconcileReport:
    checked: int = 0
    differences: list[Difference] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (device or service, reason)
    enqueued: list[int] = field(default_factory=list)


async def reconcile(conninfo: str, settings: WlSettings | None = None, *, dry_run: bool = False) -> ReconcileReport:
    settings = settings or WlSettings()
    timeouts = Timeouts(connect=settings.http_connect_timeout, read=settings.http_read_timeout)
    report = ReconcileReport()
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        for device in await list_devices(conn):
            services = await list_services(conn, device.name)
            if not services:
                continue
            try:
                password = resolve_password(device.password_ref)
            except SecretUnavailable as exc:
                report.errors.append((device.name, str(exc)))
                RECONCILE.labels(device.name, "error").inc(len(services))
                logger.error("reconcile_device_failed", extra={"event": "reconcile_device_failed", "device": device.name, "error": str(exc)})
                continue
            driver = make_driver(device, password, timeouts)
            try:
                for service in services:
                    report.checked += 1
                    try:
                        observed = await driver.read_state(service.method, service.target)
                    except DeviceError as exc:
                        report.errors.append((service.service_id, f"{exc.kind}: {exc.reason}"))
                        RECONCILE.labels(device.name, "error").inc()
                        logger.warning("reconcile_read_failed", extra={"event": "reconcile_read_failed", "device": device.name, "service_id": service.service_id, "error": exc.reason})
                        continue
                    if observed.state == service.desired_state:
                        RECONCILE.labels(device.name, "in_sync").inc()
                        continue
                    RECONCILE.labels(device.name, "differs").inc()
                    action = ACTIVATE if service.desired_state == "active" else DEACTIVATE
                    report.differences.append(
                        Difference(service.service_id, device.name, service.desired_state, observed.state, observed.detail, action, service.desired_event_at or EPOCH)
                    )
            finally:
                await driver.aclose()
        if not dry_run and report.differences:
            await _enqueue(conn, report)
    return report


async def _enqueue(conn: psycopg.AsyncConnection[Any], report: ReconcileReport) -> None:
    producer = AsyncProducer()
    async with conn.transaction():
        for diff in report.differences:
            reason = f"reconcile: device says {diff.observed}, desired {diff.desired}"
            msg_id = await producer.enqueue(DEVICE_ACTIONS, action_message(diff.action, diff.service_id, diff.event_at, reason), conn=conn)
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
            return await reconcile(conninfo, settings)
        finally:
            await lock_conn.execute(_sql.RELEASE_RECONCILE_LOCK)
