"""Refuse a router call whose packets would not leave through the tunnel.

The router's credentials travel with every call (Basic auth, the API login). If the namespace the worker runs in
has no tunnel at that moment (wireguard restarting, a namespace owner restarted under us, a malformed key) the
kernel may route a device address out of the compose network, where anyone holding that address receives the
credentials. The deployment's ``unreachable`` routes (``deploy/netns/owner.sh``) are the first line; this is the
second: with ``WL_REQUIRE_ROUTE_VIA=wg0`` every call first asks the kernel which interface its routing decision for
the device address uses, and refuses the call (a transient error, so the job is retried and nothing is lost)
unless that interface is the tunnel.

The question is asked with one ``RTM_GETROUTE`` netlink request, the same one ``ip route get ADDR`` sends: it
answers for the caller's own network namespace, needs no privilege, sends no packet and takes microseconds. Done
here with the standard library because the worker's image has no iproute2 and pyroute2 (a large library) would be
a dependency for one 28-byte request.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import logging
import os
import socket
import struct
from collections.abc import Mapping

from .drivers import MenuApi, TransientDeviceError
from .metrics import ROUTE_GUARD_REFUSALS

logger = logging.getLogger(__name__)

ENV_VAR = "WL_REQUIRE_ROUTE_VIA"


# linux/netlink.h, linux/rtnetlink.h
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLM_F_REQUEST = 1
RTA_DST, RTA_OIF = 1, 4
RTM_F_LOOKUP_TABLE = 0x1000
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")
_sequence = itertools.count(1)


class RouteNotViaTunnel(TransientDeviceError):
    """The kernel's route to the device address does not leave through the tunnel interface: call refused."""


class RouteLookupError(Exception):
    """The kernel answered the route request with an error (no route, unreachable): ``errno`` says which."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.errno = code


def required_interface(environ: Mapping[str, str] = os.environ) -> str | None:
    """The tunnel interface named by ``WL_REQUIRE_ROUTE_VIA`` (None: the guard is off)."""
    value = environ.get(ENV_VAR, "").strip()
    return value or None


def route_interface(address: str) -> str:
    """The interface the kernel's routing decision for ``address`` leaves by, in this network namespace.

    Raises :class:`RouteLookupError` when the kernel has no usable route (``unreachable`` → EHOSTUNREACH, none at
    all → ENETUNREACH), ``ValueError`` for something that is not an IP address."""
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    dst = ip.packed
    attr = _RTATTR.pack(_RTATTR.size + len(dst), RTA_DST) + dst  # 4 or 16 bytes: already 4-aligned
    body = _RTMSG.pack(family, len(dst) * 8, 0, 0, 0, 0, 0, 0, RTM_F_LOOKUP_TABLE) + attr
    seq = next(_sequence)
    request = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(request)
        reply = sock.recv(65536)
    offset = 0
    while offset + _NLMSGHDR.size <= len(reply):
        length, kind, _, reply_seq, _ = _NLMSGHDR.unpack_from(reply, offset)
        if length < _NLMSGHDR.size:
            break
        payload = reply[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        if reply_seq != seq:
            continue
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", payload)
            raise RouteLookupError(-code if code else errno.EIO)
        if kind == RTM_NEWROUTE:
            oif = _attribute_u32(payload[_RTMSG.size :], RTA_OIF)
            if oif is None:
                raise RouteLookupError(errno.ENETUNREACH)
            return socket.if_indextoname(oif)
    raise RouteLookupError(errno.EIO)


def _attribute_u32(attrs: bytes, wanted: int) -> int | None:
    offset = 0
    while offset + _RTATTR.size <= len(attrs):
        length, kind = _RTATTR.unpack_from(attrs, offset)
        if length < _RTATTR.size:
            return None
        if kind == wanted and length >= _RTATTR.size + 4:
            (value,) = struct.unpack_from("=I", attrs, offset + _RTATTR.size)
            return int(value)
        offset += (length + 3) & ~3
    return None


def route_problem(address: str, interface: str) -> str | None:
    """Why a call to ``address`` must not go out now, or None when the kernel routes it through ``interface``."""
    try:
        actual = route_interface(address)
    except RouteLookupError as exc:
        return f"no route to {address} ({exc}); the tunnel {interface} is not up"
    except OSError as exc:  # the netlink socket itself (should not happen; refuse rather than guess)
        return f"cannot ask the kernel for the route to {address}: {exc.strerror or exc}"
    if actual != interface:
        return f"the route to {address} leaves by {actual}, not the tunnel {interface}"
    return None


async def _addresses(host: str) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RouteNotViaTunnel(f"route guard: cannot resolve {host}: {exc}") from exc
    return sorted({str(info[4][0]) for info in infos})


class RouteGuardedApi:
    """A :class:`MenuApi` that checks the route to the device before each call it passes on."""

    def __init__(self, api: MenuApi, *, device: str, host: str, interface: str) -> None:
        self._api = api
        self._device = device
        self._host = host
        self._interface = interface

    async def _check(self) -> None:
        for address in await _addresses(self._host):
            problem = route_problem(address, self._interface)
            if problem is not None:
                reason = "no_route" if problem.startswith("no route") else "other_interface"
                ROUTE_GUARD_REFUSALS.labels(device=self._device, reason=reason).inc()
                # the reason names addresses and interfaces, never the device's credentials
                logger.warning(
                    "route_guard_refused",
                    extra={"event": "route_guard_refused", "device": self._device, "address": address,
                           "interface": self._interface, "reason": problem},
                )  # fmt: skip
                raise RouteNotViaTunnel(f"route guard: {problem}; router call refused")

    async def print(self, menu: str, **filters: str) -> list[dict[str, str]]:
        await self._check()
        return await self._api.print(menu, **filters)

    async def set(self, menu: str, item_id: str, values: dict[str, str]) -> bool:
        await self._check()
        return await self._api.set(menu, item_id, values)

    async def add(self, menu: str, values: dict[str, str]) -> None:
        await self._check()
        await self._api.add(menu, values)

    async def remove(self, menu: str, item_id: str) -> None:
        await self._check()
        await self._api.remove(menu, item_id)

    async def aclose(self) -> None:
        await self._api.aclose()


def guard(api: MenuApi, *, device: str, host: str, environ: Mapping[str, str] = os.environ) -> MenuApi:
    """``api`` wrapped in the route check when ``WL_REQUIRE_ROUTE_VIA`` names an interface, else ``api``."""
    interface = required_interface(environ)
    if interface is None:
        return api
    return RouteGuardedApi(api, device=device, host=host, interface=interface)
