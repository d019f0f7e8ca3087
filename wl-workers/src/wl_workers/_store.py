"""Devices and customer services in the database, and resolving a device's password reference."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import psycopg

from . import _sql

Method = Literal["address-list", "pppoe"]
State = Literal["active", "suspended"]
METHODS: tuple[Method, ...] = ("address-list", "pppoe")
STATES: tuple[State, ...] = ("active", "suspended")

_REF = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+)$")


class NotFound(LookupError):
    """A device or service that does not exist."""


class SecretUnavailable(RuntimeError):
    """A password reference that cannot be resolved (variable unset, file missing or unreadable)."""


def validate_password_ref(ref: str) -> str:
    if not _REF.match(ref):
        raise ValueError(f"password reference must be env:NAME or file:/absolute/path, got {ref!r}")
    return ref


def resolve_password(ref: str) -> str:
    """The password a reference names, read now (so a rotated secret is picked up without a restart)."""
    validate_password_ref(ref)
    kind, _, where = ref.partition(":")
    if kind == "env":
        value = os.environ.get(where)
        if value is None:
            raise SecretUnavailable(f"environment variable {where} is not set")
        return value
    try:
        return Path(where).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise SecretUnavailable(f"cannot read password file {where}: {exc.strerror or exc}") from exc


def validate_target(method: str, target: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    target = target.strip()
    if method == "address-list":
        return _address_target(target)
    if not target or any(ch.isspace() for ch in target):
        raise ValueError(f"PPPoE user must be non-empty without spaces, got {target!r}")
    return target


def _address_target(target: str) -> str:
    """An IPv4/IPv6 address or prefix, canonical: a host without /32 or /128 (as RouterOS writes IPv4 hosts)."""
    try:
        network = ipaddress.ip_network(target, strict=False)
    except ValueError as exc:
        raise ValueError(f"address-list services need the customer's IP address or prefix, IPv4 or IPv6 (10.20.0.11, 10.20.5.0/29, 2001:db8::1, 2001:db8:5::/56), got {target!r}") from exc
    if network.network_address != ipaddress.ip_interface(target).ip:
        raise ValueError(f"{target} has host bits set: the prefix is {network}")
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


@dataclass(frozen=True)
class Device:
    id: int
    name: str
    driver: str
    host: str
    port: int | None
    scheme: str
    ca_file: str | None
    tls_insecure: bool
    username: str
    password_ref: str
    max_concurrent: int
    address_list: str
    own_entries_only: bool = True

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        return f"{self.scheme}://{host}{port}"

    def public(self) -> dict[str, Any]:
        """What an operator may see: the password's reference, never the password."""
        return asdict(self)


@dataclass(frozen=True)
class Service:
    service_id: str
    device: str
    method: Method
    target: str
    desired_state: State
    desired_event_at: datetime | None
    applied_state: State | None
    applied_event_at: datetime | None
    applied_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    device_id: int
    desired_generation: int = 1
    applied_generation: int | None = None
    observed_state: str | None = None
    observed_at: datetime | None = None


def _device(row: tuple[Any, ...]) -> Device:
    return Device(*row)


def _service(row: tuple[Any, ...]) -> Service:
    return Service(*row)


AConn = psycopg.AsyncConnection[Any]


async def add_device(conn: AConn, **fields: Any) -> int:
    validate_password_ref(fields["password_ref"])
    if fields.get("max_concurrent", 2) < 1:
        raise ValueError("max_concurrent must be >= 1")
    fields.setdefault("driver", "routeros-rest")
    fields.setdefault("port", None)
    fields.setdefault("scheme", "https")
    fields.setdefault("ca_file", None)
    fields.setdefault("tls_insecure", False)
    fields.setdefault("max_concurrent", 2)
    fields.setdefault("address_list", "morosos")
    fields.setdefault("own_entries_only", True)
    cur = await conn.execute(_sql.INSERT_DEVICE, fields)
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def list_devices(conn: AConn) -> list[Device]:
    cur = await conn.execute(_sql.LIST_DEVICES)
    return [_device(r) for r in await cur.fetchall()]


async def get_device(conn: AConn, name: str) -> Device:
    cur = await conn.execute(_sql.GET_DEVICE, (name,))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no device named {name!r}")
    return _device(row)


async def get_device_by_id(conn: AConn, device_id: int) -> Device:
    cur = await conn.execute(_sql.GET_DEVICE_BY_ID, (device_id,))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no device with id {device_id}")
    return _device(row)


async def move_device(conn: AConn, name: str, *, host: str, port: int | None, scheme: str) -> None:
    """Point a device at another address (the demo router, whose simulator may listen elsewhere next time)."""
    await conn.execute(_sql.MOVE_DEVICE, {"name": name, "host": host, "port": port, "scheme": scheme})


async def remove_device(conn: AConn, name: str) -> None:
    device = await get_device(conn, name)
    cur = await conn.execute(_sql.DEVICE_SERVICE_COUNT, (device.id,))
    row = await cur.fetchone()
    count = int(row[0]) if row else 0
    if count:
        raise ValueError(f"device {name!r} still has {count} service(s): move or remove them first")
    await conn.execute(_sql.DELETE_DEVICE, (name,))


async def add_service(conn: AConn, service_id: str, device: str, method: str, target: str, desired_state: str = "active") -> None:
    if desired_state not in STATES:
        raise ValueError(f"desired state must be active or suspended, got {desired_state!r}")
    params = {"service_id": service_id, "device": device, "method": method, "target": validate_target(method, target), "desired_state": desired_state}
    cur = await conn.execute(_sql.INSERT_SERVICE, params)
    if await cur.fetchone() is None:
        raise NotFound(f"no device named {device!r}")


async def get_service(conn: AConn, service_id: str) -> Service:
    cur = await conn.execute(_sql.GET_SERVICE, (service_id,))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no customer service {service_id!r}")
    return _service(row)


async def list_services(conn: AConn, device: str | None = None) -> list[Service]:
    cur = await conn.execute(_sql.LIST_SERVICES, {"device": device})
    return [_service(r) for r in await cur.fetchall()]
