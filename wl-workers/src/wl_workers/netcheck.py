"""The device-network self-check of ``wl-workers run``: is the WireGuard interface there and up, and does at least
one device address accept a TCP connection?

The worker shares its network namespace with the WireGuard client (docs/vpn.md). If that namespace loses the
tunnel for good (a ``network_mode: service:`` namespace left with only ``lo``, a client that never comes back), a
worker that carries on only fails every device job. So the check feeds ``/readyz`` (the ``device_network`` check,
with the reason), and :class:`NetworkMonitor` runs it every ``interval`` seconds; once it has failed continuously
for ``exit_after`` seconds the monitor reports the loss, the runner stops the worker gracefully and the process
exits non-zero, so the container's restart policy starts it again in a fresh namespace.

The interface is looked up with ``SIOCGIFFLAGS`` on a socket, which answers for the caller's own network
namespace (``/sys/class/net`` shows the namespace of whoever mounted it, and the image has no iproute2).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from .metrics import NETCHECKS

logger = logging.getLogger(__name__)

SIOCGIFFLAGS = 0x8913  # linux/sockios.h
IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: the name, then ifr_flags in the 24-byte union
IFNAMSIZ = 16
READINESS_CONNECT_LIMIT = 4.0


class DeviceNetworkDown(Exception):
    """One check failed; the message is the reason (what ``/readyz`` shows)."""

    def __init__(self, reason: str, *, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # "interface", "route" or "targets": the metric's label


class DeviceNetworkLost(RuntimeError):
    """The check failed for longer than ``exit_after``: the worker stopped so that it is restarted."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_targets(text: str) -> tuple[Target, ...]:
    """``"10.20.0.1:443, 10.20.1.1:8728, [fd00::1]:443"`` → targets; a clear ``ValueError`` for anything else."""
    targets = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, sep, port_text = item.rpartition(":")
        if not sep or not host:
            raise ValueError(f"device-network target {item!r}: expected host:port (IPv6 as [addr]:port)")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"device-network target {item!r}: {host!r} is not an IPv6 address") from None
        elif ":" in host or any(c.isspace() for c in host):
            raise ValueError(f"device-network target {item!r}: expected host:port (IPv6 as [addr]:port)")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"device-network target {item!r}: port must be 1-65535")
        targets.append(Target(host, int(port_text)))
    return tuple(targets)


def validate_interface_name(name: str) -> str:
    """Linux's rules for an interface name (dev_valid_name): 1-15 bytes, no '/', ':' or whitespace."""
    if not name or len(name.encode()) >= IFNAMSIZ or name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise ValueError(f"device-network interface {name!r} is not a valid interface name (1-15 characters, no '/', ':' or spaces)")
    return name


@dataclass(frozen=True)
class NetcheckConfig:
    """``interface`` must exist and be up; at least one of ``targets`` must accept a TCP connection within
    ``connect_timeout``. At least one of the two is required. ``exit_after`` 0 = never exit (readiness only)."""

    interface: str | None = None
    targets: tuple[Target, ...] = ()
    interval: float = 10.0
    exit_after: float = 60.0
    connect_timeout: float = 3.0

    def __post_init__(self) -> None:
        if self.interface is None and not self.targets:
            raise ValueError("a device-network check needs an interface, targets, or both")
        if self.interface is not None:
            validate_interface_name(self.interface)
        if not self.interval > 0 or not self.connect_timeout > 0 or not self.exit_after >= 0:
            raise ValueError("device-network check: interval and connect timeout must be > 0, exit_after >= 0")

    def describe(self) -> dict[str, object]:
        return {"interface": self.interface, "targets": [str(t) for t in self.targets], "exit_after": self.exit_after}


def interface_problem(name: str) -> str | None:
    """Why ``name`` cannot carry device traffic in this network namespace, or None when it is there and up."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            reply = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, _IFREQ.pack(name.encode(), 0))
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return f"interface {name} does not exist"
        return f"interface {name} cannot be checked: {exc.strerror or exc}"
    _, flags = _IFREQ.unpack(reply)
    return None if flags & IFF_UP else f"interface {name} is down"


async def _connect_problem(target: Target, limit: float) -> str | None:
    try:
        async with asyncio.timeout(limit):
            _, writer = await asyncio.open_connection(target.host, target.port)
    except TimeoutError:
        return f"{target} no answer within {limit:g}s"
    except OSError as exc:
        # asyncio's message is "Connect call failed (addr)": the errno's own text says why (refused, unreachable)
        named = exc.errno is not None and exc.errno > 0 and not isinstance(exc, socket.gaierror)
        return f"{target} {os.strerror(exc.errno) if named and exc.errno else exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


def _route_problem(host: str, interface: str) -> str | None:
    from .route_guard import route_problem  # imports drivers, which this module must not import at load time

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: resolved at connect time, checked by the route guard before each router call
    return route_problem(host, interface)


async def check(config: NetcheckConfig) -> None:
    """Returns when the device network looks usable; raises :class:`DeviceNetworkDown` with the reason if not."""
    if config.interface is not None:
        problem = interface_problem(config.interface)
        if problem is not None:
            raise DeviceNetworkDown(problem, kind="interface")
    if config.interface is not None:
        # wg0 may exist while the namespace is not the tunnel's (an orphaned namespace after its owner restarted,
        # routes gone): the kernel's routing decision for each target must use the interface
        for target in config.targets:
            problem = _route_problem(target.host, config.interface)
            if problem is not None:
                raise DeviceNetworkDown(problem, kind="route")
    if config.targets:
        problems = await asyncio.gather(*(_connect_problem(t, config.connect_timeout) for t in config.targets))
        if all(p is not None for p in problems):
            raise DeviceNetworkDown("no device address answered: " + "; ".join(p for p in problems if p), kind="targets")


class NetworkMonitor:
    """Runs :func:`check` every ``interval``; :meth:`run` returns a :class:`DeviceNetworkLost` once the check has
    failed without a pause for ``exit_after`` seconds. :meth:`readiness` is the ``/readyz`` hook (a fresh check)."""

    def __init__(self, config: NetcheckConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.failing_since: float | None = None
        self.reason: str | None = None
        # pg-worker gives a readiness hook 5 s: a longer connect timeout would hide the reason behind a timeout
        self._for_readiness = replace(config, connect_timeout=min(config.connect_timeout, READINESS_CONNECT_LIMIT))

    async def readiness(self) -> bool:
        try:
            await check(self._for_readiness)
        except DeviceNetworkDown as exc:
            since = self.failing_since
            suffix = f" (failing for {self.clock() - since:.0f}s)" if since is not None else ""
            raise DeviceNetworkDown(exc.reason + suffix, kind=exc.kind) from None
        return True

    async def check_once(self) -> DeviceNetworkLost | None:
        """One periodic check, with its logs and metric; the loss once it has lasted ``exit_after``."""
        try:
            await check(self.config)
        except DeviceNetworkDown as exc:
            return self._failed(exc)
        NETCHECKS.labels(result="ok").inc()
        if self.failing_since is not None:
            down_for = self.clock() - self.failing_since
            logger.info(
                "device_network_restored",
                extra={"event": "device_network_restored", **self.config.describe(), "down_for": round(down_for, 1)},
            )
        self.failing_since, self.reason = None, None
        return None

    def _failed(self, exc: DeviceNetworkDown) -> DeviceNetworkLost | None:
        NETCHECKS.labels(result=exc.kind).inc()
        now = self.clock()
        context = {**self.config.describe(), "reason": exc.reason}
        if self.failing_since is None:
            self.failing_since = now
            logger.warning("device_network_down", extra={"event": "device_network_down", **context})
        self.reason = exc.reason
        down_for = now - self.failing_since
        if self.config.exit_after > 0 and down_for >= self.config.exit_after:
            logger.error("device_network_lost", extra={"event": "device_network_lost", **context, "down_for": round(down_for, 1)})
            return DeviceNetworkLost(
                f"device network lost for {down_for:.0f}s ({exc.reason}); exiting so that the restart policy restarts the worker"
            )
        return None

    async def run(self, stop: asyncio.Event) -> DeviceNetworkLost | None:
        """Checks until ``stop`` is set (→ None) or the device network is lost (→ the loss)."""
        logger.info("device_network_check_enabled", extra={"event": "device_network_check_enabled", **self.config.describe(), "interval": self.config.interval})
        while not stop.is_set():
            lost = await self.check_once()
            if lost is not None:
                return lost
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.interval)
        return None
