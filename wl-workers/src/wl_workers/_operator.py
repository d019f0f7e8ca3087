"""What the operator commands do to the rows: validate, change, and record who changed what in the service's history.

The CLI (and an import) only render and confirm; every change here runs in the caller's transaction, so a failure
leaves nothing half done. The router is never changed from here: a change that the router must follow (a suspended
service moved or retargeted) enqueues the usual ``device_actions`` job, which the worker applies with its own
password resolution, locks and verification.
"""

from __future__ import annotations

import asyncio
import getpass
import ipaddress
import os
import re
import ssl
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg.errors

from pg_worker import AsyncProducer

from . import _sql, history
from ._store import (
    METHODS,
    SecretUnavailable,
    Service,
    get_device,
    get_service,
    list_services,
    resolve_password,
    validate_password_ref,
    validate_target,
)
from ._store import (
    add_service as _insert_service,
)
from .actions import ACTIVATE, DEACTIVATE, action_message
from .drivers import DeviceError, Timeouts, make_driver
from .settings import DEVICE_ACTIONS

AConn = psycopg.AsyncConnection[Any]

# Service ids: what billing systems use as customer or contract numbers. ASCII letters and digits first, then also
# . _ - : @ ; 1 to 200 characters; unique regardless of case (CUST-1 and cust-1 are one customer, typed twice).
SERVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$"
_SERVICE_ID = re.compile(SERVICE_ID_PATTERN, re.ASCII)
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", re.ASCII)  # as the CHECK of migration 0001
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$", re.ASCII)
HOST_MAX = 253


class OperatorError(ValueError):
    """Bad input for an operator command, said in one line (exit status 2)."""


def os_user() -> str:
    """Who runs the command, for the history: the login name (``SUDO_USER`` first: who is behind a sudo)."""
    for variable in ("SUDO_USER", "USER", "LOGNAME"):
        if os.environ.get(variable):
            return os.environ[variable]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def validate_service_id(service_id: str) -> str:
    if not _SERVICE_ID.fullmatch(service_id):
        shown = service_id if len(service_id) <= 60 else service_id[:60] + "..."
        raise OperatorError(
            f"service id {shown!r} is not valid: 1-200 ASCII letters, digits and . _ - : @, starting with a letter or digit"
        )
    return service_id


def validate_host(host: str) -> str:
    """A hostname (RFC 1123) or an IP literal; never a URL, a host:port, or text with spaces."""
    shown = host if len(host) <= 60 else host[:60] + "..."
    if "://" in host or "/" in host:
        raise OperatorError(f"host {shown!r}: give the bare host name or IP (the scheme is --scheme, the port --port)")
    if host != host.strip() or any(ch.isspace() for ch in host):
        raise OperatorError(f"host {shown!r}: spaces are not allowed")
    if not host or len(host) > HOST_MAX:
        raise OperatorError(f"host {shown!r}: must be 1-{HOST_MAX} characters")
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    if ":" in host:
        raise OperatorError(f"host {shown!r}: give the port with --port, not in the host")
    labels = host.rstrip(".").split(".")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise OperatorError(f"host {shown!r} is neither a host name (letters, digits, hyphens, dots) nor an IP address")
    return host.rstrip(".").lower()


def validate_ca_file(path: str | None) -> str | None:
    """A readable file of PEM certificates, checked now (a wrong path would fail every action for half an hour)."""
    if path is None:
        return None
    if not os.path.isabs(path):
        raise OperatorError(f"--ca-file {path!r}: give an absolute path (the worker runs elsewhere)")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError:  # (an OSError too: first)
        raise OperatorError(f"--ca-file {path}: not a PEM file of CA certificates") from None
    except OSError as exc:
        raise OperatorError(f"--ca-file {path}: cannot read it ({exc.strerror or exc})") from None
    return path


def validate_port(port: int | None) -> int | None:
    if port is not None and not 1 <= port <= 65535:
        raise OperatorError(f"--port {port}: must be between 1 and 65535")
    return port


def validate_max_concurrent(value: int) -> int:
    if not 1 <= value <= 64:
        raise OperatorError(f"--max-concurrent {value}: must be between 1 and 64")
    return value


def device_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """All of a device's fields checked, in the form they are stored."""
    if fields["driver"] not in ("routeros-rest", "routeros-api"):
        raise OperatorError(f"driver must be routeros-rest or routeros-api, got {fields['driver']!r}")
    if fields["scheme"] not in ("https", "http"):
        raise OperatorError(f"scheme must be https or http, got {fields['scheme']!r}")
    if not DEVICE_NAME.fullmatch(fields["name"]):
        raise OperatorError(f"device name {fields['name'][:60]!r}: 1-63 letters, digits, . _ -, starting with a letter or digit")
    checked = dict(fields)
    checked["host"] = validate_host(str(fields["host"]))
    checked["port"] = validate_port(fields.get("port"))
    checked["ca_file"] = validate_ca_file(fields.get("ca_file") or None)
    checked["max_concurrent"] = validate_max_concurrent(int(fields.get("max_concurrent", 2)))
    if not str(fields.get("username") or "").strip():
        raise OperatorError("username must not be empty")
    try:
        validate_password_ref(str(fields["password_ref"]))
    except ValueError as exc:
        raise OperatorError(str(exc)) from None
    if not str(fields.get("address_list") or "morosos").strip():
        raise OperatorError("address list must not be empty")
    checked["own_entries_only"] = bool(fields.get("own_entries_only", True))
    return checked


def checked_target(method: str, target: str) -> str:
    try:
        return validate_target(method, target)
    except ValueError as exc:
        raise OperatorError(str(exc)) from None


async def check_new_service_id(conn: AConn, service_id: str) -> None:
    validate_service_id(service_id)
    cur = await conn.execute(_sql.SERVICE_ID_CASEFOLD, (service_id,))
    row = await cur.fetchone()
    if row is not None:
        same = "already exists" if row[0] == service_id else f"already exists as {row[0]!r} (ids are unique regardless of case)"
        raise OperatorError(f"service {service_id!r} {same}")


async def check_target_free(conn: AConn, device: str, method: str, target: str, service_id: str) -> None:
    cur = await conn.execute(_sql.SERVICE_AT_TARGET, {"device": device, "method": method, "target": target})
    row = await cur.fetchone()
    if row is not None and row[0] != service_id:
        raise OperatorError(f"device {device} already switches {method} {target} for service {row[0]!r}")


@dataclass
class Change:
    """What a command did (or, with --dry-run, would do): one line per effect, for the operator."""

    effects: list[str] = field(default_factory=list)


def _suspended(service: Service) -> bool:
    return service.desired_state == "suspended" or service.applied_state == "suspended"


def _left_behind(service: Service) -> str:
    where = f"address-list entry {service.target}" if service.method == "address-list" else f"disabled PPP secret {service.target}"
    return f"the {where} stays on device {service.device}: undo it there by hand"


async def add_service(conn: AConn, service_id: str, device: str, method: str, target: str, state: str, *, actor: str, reason: str | None = None) -> None:
    """Add a service (a new id, on a device that exists, at a target no other service uses) and record who added
    it. Run it inside the caller's transaction: the checks hold only there."""
    await check_new_service_id(conn, service_id)
    await get_device(conn, device)
    await check_target_free(conn, device, method, target, service_id)
    await _insert_service(conn, service_id, device, method, target, state)
    await history.record(
        conn, service_id, "service_added", source="operator", actor=actor, reason=reason, state=state,
        detail={"device": device, "method": method, "target": target},
    )  # fmt: skip


async def remove_service(conn: AConn, service_id: str, *, force: bool, actor: str, reason: str | None) -> Change:
    service = await get_service(conn, service_id)
    change = Change()
    if _suspended(service):
        if not force:
            raise OperatorError(
                f"service {service_id} is suspended on device {service.device}: `wl-workers activate {service_id}` first "
                "(so the router lets the customer through), or --force to remove it anyway"
            )
        change.effects.append(_left_behind(service))
    await conn.execute(_sql.DELETE_SERVICE, (service_id,))
    await history.record(
        conn, service_id, "service_removed", source="operator", actor=actor, reason=reason, state=service.desired_state,
        detail={"device": service.device, "method": service.method, "target": service.target},
    )  # fmt: skip
    change.effects.insert(0, f"service {service_id} removed from device {service.device}")
    return change


async def update_service(
    conn: AConn, service_id: str, *, device: str | None, method: str | None, target: str | None, force: bool, actor: str, reason: str | None
) -> Change:
    """Move a service to another device and/or change how it is switched; a suspended one is suspended again at
    its new place by a ``service.deactivate`` job (with the event time that suspended it, so it never outranks a
    newer event)."""
    service = await get_service(conn, service_id)
    new_device = device or service.device
    await get_device(conn, new_device)
    new_method = method or service.method
    if new_method not in METHODS:
        raise OperatorError(f"method must be one of {', '.join(METHODS)}, got {new_method!r}")
    if method is not None and method != service.method and target is None:
        raise OperatorError(f"changing the method of service {service_id} needs its --target for {method}")
    new_target = checked_target(new_method, target if target is not None else service.target)
    before = {"device": service.device, "method": service.method, "target": service.target}
    after = {"device": new_device, "method": new_method, "target": new_target}
    if before == after:
        return Change([f"service {service_id}: nothing to change"])
    await check_target_free(conn, new_device, new_method, new_target, service_id)
    change = Change()
    if _suspended(service):
        if not force:
            raise OperatorError(
                f"service {service_id} is suspended on device {service.device}: `wl-workers activate {service_id}` first, "
                "or --force to change it anyway (it is then suspended at its new place)"
            )
        change.effects.append(_left_behind(service))
    await conn.execute(_sql.UPDATE_SERVICE, {"service_id": service_id, **after})
    kind = "service_moved" if new_device != service.device else "service_updated"
    await history.record(conn, service_id, kind, source="operator", actor=actor, reason=reason, detail={"before": before, "after": after})
    described = ", ".join(f"{k} {before[k]} -> {after[k]}" for k in before if before[k] != after[k])
    change.effects.insert(0, f"service {service_id}: {described}")
    if service.desired_state == "suspended":
        event_at = service.desired_event_at or datetime(1970, 1, 1, tzinfo=UTC)
        message = {**action_message(DEACTIVATE, service_id, event_at, f"suspended again after {kind.replace('_', ' ')}"), "source": "operator", "actor": actor}
        await AsyncProducer().enqueue(DEVICE_ACTIONS, message, conn=conn)
        change.effects.append(f"enqueued {DEACTIVATE} for {service_id} on device {new_device}")
    return change


async def update_device(conn: AConn, name: str, changes: dict[str, Any], *, actor: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(before, after) of the device's fields that changed; each of its services' history notes the change."""
    device = await get_device(conn, name)
    current = device.public()
    merged = {**current, **{k: v for k, v in changes.items() if v is not None}}
    if changes.get("ca_file") == "":
        merged["ca_file"] = None
    checked = device_fields(merged)
    before = {k: current[k] for k in changes if k in current and current[k] != checked[k]}
    after = {k: checked[k] for k in before}
    if not after:
        return {}, {}
    await conn.execute(_sql.UPDATE_DEVICE, {k: checked[k] for k in (
        "name", "driver", "host", "port", "scheme", "ca_file", "tls_insecure", "username", "password_ref", "max_concurrent", "address_list",
        "own_entries_only",
    )})  # fmt: skip
    for service in await list_services(conn, name):
        await history.record(conn, service.service_id, "service_updated", source="operator", actor=actor, reason=f"device {name} updated", detail={"before": before, "after": after})
    return before, after


def describe_cause(row: dict[str, Any]) -> str:
    """The cause of a history row, in words: 'billing event msg_1 (payment.approved)', 'operator ana (reason)'."""
    source, actor, reason = row.get("source"), row.get("actor"), row.get("reason")
    detail = row.get("detail") or {}
    event_type = detail.get("event_type") if isinstance(detail, dict) else None
    if source == "webhook":
        who = f"billing event {row.get('event_id') or '?'}" + (f" ({event_type})" if event_type else "")
        if row.get("payment_id"):
            who += f", payment {row['payment_id']}"
    elif source == "payment_sync":
        who = f"payment {row.get('payment_id') or '?'}" + (f" ({actor})" if actor else "")
    elif source in ("operator", "console"):
        who = f"{'operator' if source == 'operator' else 'console user'} {actor or '?'}" + (f": {reason}" if reason else "")
    elif source == "reconcile":
        who = "reconcile" + (f": {reason}" if reason else "")
    else:
        who = f"{source or 'unknown source'}" + (f" {actor}" if actor else "") + (f": {reason}" if reason else "")
    return who


WHY_KINDS = ("desired_changed", "event_accepted")


async def why(conn: AConn, service: Service) -> str:
    """One line: why the service is in its desired state, from its history ('suspended since ... by ...')."""
    try:
        cur = await conn.execute(_sql.LAST_CAUSE, (service.service_id, list(WHY_KINDS), service.desired_state))
    except psycopg.errors.UndefinedTable:  # a database migrated before the history existed: show the rest
        return f"{service.desired_state} (no history table: run `wl-workers migrate`)"
    row = await cur.fetchone()
    if row is None:
        return f"{service.desired_state} (no recorded event)"
    entry = dict(zip(history.COLUMNS, row, strict=True))
    at = entry["at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{service.desired_state} since {at} by {describe_cause(entry)}"


async def enqueue_operator_action(conn: AConn, service_id: str, *, activate: bool, reason: str, actor: str) -> int:
    """An operator's activate/deactivate: the worker records it (desired state, history) with who and why."""
    await get_service(conn, service_id)  # refuse an unknown service here rather than dead-letter it later
    message = {**action_message(ACTIVATE if activate else DEACTIVATE, service_id, datetime.now(UTC), reason), "source": "operator", "actor": actor}
    return await AsyncProducer().enqueue(DEVICE_ACTIONS, message, conn=conn)

# -- device test ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCheck:
    ok: bool
    message: str
    by: str  # "worker" or "this shell"


async def check_device_via_worker(conn: AConn, name: str, *, actor: str, wait: float, poll: float = 0.2) -> DeviceCheck:
    """Enqueue a ``device.test`` job and wait for the worker's answer in ``wl.device_tests``: the password is
    resolved where the worker runs, as every action does."""
    await get_device(conn, name)
    request_id = uuid.uuid4().hex
    message = {"type": "device.test", "device": name, "source": "operator", "actor": actor, "request_id": request_id}
    await AsyncProducer().enqueue(DEVICE_ACTIONS, message, conn=conn)
    deadline = time.monotonic() + wait
    while True:
        try:
            cur = await conn.execute(_sql.DEVICE_TEST_RESULT, (request_id,))
        except psycopg.errors.UndefinedTable:
            raise OperatorError("the database has no wl.device_tests: run `wl-workers migrate`") from None
        row = await cur.fetchone()
        if row is not None:
            return DeviceCheck(bool(row[0]), str(row[1] or ""), "worker")
        if time.monotonic() >= deadline:
            return DeviceCheck(False, f"no worker answered within {wait:g} s (is `wl-workers run` running and the device_actions queue served?)", "worker")
        await asyncio.sleep(poll)


async def check_device_here(conn: AConn, name: str, *, connect_timeout: float, read_timeout: float) -> DeviceCheck:
    """The same test from this shell: this shell's environment and files resolve the password, not the worker's."""
    device = await get_device(conn, name)
    try:
        password = resolve_password(device.password_ref)
    except SecretUnavailable as exc:
        return DeviceCheck(False, f"password {device.password_ref} does not resolve in this shell: {exc}", "this shell")
    started = time.monotonic()
    try:
        driver = make_driver(device, password, Timeouts(connect=connect_timeout, read=read_timeout))
        try:
            entries = await driver.api.print("ip/firewall/address-list", list=device.address_list)
        finally:
            await driver.aclose()
    except DeviceError as exc:
        return DeviceCheck(False, f"{device.base_url}: {exc.kind}: {exc.reason}", "this shell")
    took = time.monotonic() - started
    return DeviceCheck(True, f"{device.base_url}: logged in as {device.username}, address-list {device.address_list} has {len(entries)} entries ({took:.2f} s)", "this shell")


async def refresh_via_worker(conn: AConn, service: Service, *, actor: str, wait: float, poll: float = 0.2) -> str:
    """Ask the worker to read the router for this service (a ``service.refresh`` job) and wait for its
    ``router_read`` history row: what the router says, read with the worker's password and network."""
    cur = await conn.execute(_sql.LAST_HISTORY_ID, (service.service_id,))
    row = await cur.fetchone()
    after = int(row[0]) if row else 0
    message = {"type": "service.refresh", "service_id": service.service_id, "source": "operator", "actor": actor}
    await AsyncProducer().enqueue(DEVICE_ACTIONS, message, conn=conn)
    deadline = time.monotonic() + wait
    while True:
        cur = await conn.execute(_sql.ROUTER_READ_AFTER, (service.service_id, after))
        found = await cur.fetchone()
        if found is not None:
            at, state, outcome, error_class, detail = found
            said = (detail or {}).get("detail") or (detail or {}).get("error") or ""
            when = at.astimezone(UTC).strftime("%H:%M:%S UTC")
            if outcome == "error" or state is None:
                return f"unknown ({error_class or 'error'}: {said}) [read by the worker at {when}]"
            return f"{state}{f' ({said})' if said else ''} [read by the worker at {when}]"
        if time.monotonic() >= deadline:
            return f"unknown (no worker answered within {wait:g} s) [asked the worker]"
        await asyncio.sleep(poll)
