"""The route guard (WL_REQUIRE_ROUTE_VIA): the kernel's routing decision, asked over netlink, decides whether a
router call may go out. Here in the test's own namespace, where 127.0.0.1 is routed through ``lo``; the tunnel
cases (a route through another interface, an unreachable route) run in tests/e2e with real namespaces."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from wl_workers.drivers import TransientDeviceError
from wl_workers.metrics import REGISTRY
from wl_workers.route_guard import (
    RouteGuardedApi,
    RouteLookupError,
    RouteNotViaTunnel,
    guard,
    route_interface,
    route_problem,
)


class _Api:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def print(self, menu: str, **filters: str) -> list[dict[str, str]]:
        self.calls.append(f"print {menu}")
        return []

    async def set(self, menu: str, item_id: str, values: dict[str, str]) -> bool:
        self.calls.append(f"set {menu}")
        return True

    async def add(self, menu: str, values: dict[str, str]) -> None:
        self.calls.append(f"add {menu}")

    async def remove(self, menu: str, item_id: str) -> None:
        self.calls.append(f"remove {menu}")

    async def aclose(self) -> None:
        self.calls.append("close")


def test_the_kernel_routes_loopback_through_lo() -> None:
    assert route_interface("127.0.0.1") == "lo"
    assert route_problem("127.0.0.1", "lo") is None


def test_a_route_through_another_interface_is_a_problem() -> None:
    problem = route_problem("127.0.0.1", "wg0")
    assert problem == "the route to 127.0.0.1 leaves by lo, not the tunnel wg0"


def test_not_an_address_is_refused_before_asking() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        route_interface("router.example")


def test_a_lookup_error_names_the_errno() -> None:
    exc = RouteLookupError(errno.EHOSTUNREACH)
    assert exc.errno == errno.EHOSTUNREACH and str(exc) == "No route to host"


def test_the_guard_is_off_unless_an_interface_is_named() -> None:
    api = _Api()
    assert guard(api, device="r1", host="127.0.0.1", environ={}) is api
    assert guard(api, device="r1", host="127.0.0.1", environ={"WL_REQUIRE_ROUTE_VIA": " "}) is api
    assert isinstance(guard(api, device="r1", host="127.0.0.1", environ={"WL_REQUIRE_ROUTE_VIA": "wg0"}), RouteGuardedApi)


async def test_every_call_is_checked_and_refused_when_the_route_is_wrong() -> None:
    api = _Api()
    guarded = guard(api, device="r-guard", host="127.0.0.1", environ={"WL_REQUIRE_ROUTE_VIA": "wg0"})
    before = _refusals("r-guard")
    calls: list[Any] = [guarded.print("ip/address"), guarded.set("m", "*1", {}), guarded.add("m", {}), guarded.remove("m", "*1")]
    for call in calls:
        with pytest.raises(RouteNotViaTunnel, match=r"^route guard: the route to 127.0.0.1 leaves by lo, not the tunnel wg0; router call refused$") as info:
            await call
        assert isinstance(info.value, TransientDeviceError)  # retried, never dead-lettered for this
    await guarded.aclose()
    assert api.calls == ["close"]  # nothing reached the router
    assert _refusals("r-guard") == before + 4


async def test_calls_pass_when_the_route_uses_the_interface() -> None:
    api = _Api()
    guarded = guard(api, device="r1", host="127.0.0.1", environ={"WL_REQUIRE_ROUTE_VIA": "lo"})
    assert await guarded.print("ip/address") == []
    assert await guarded.set("m", "*1", {}) is True
    await guarded.add("m", {})
    await guarded.remove("m", "*1")
    assert api.calls == ["print ip/address", "set m", "add m", "remove m"]


async def test_a_host_name_is_resolved_and_each_address_checked() -> None:
    guarded = guard(_Api(), device="r1", host="localhost", environ={"WL_REQUIRE_ROUTE_VIA": "wg0"})
    with pytest.raises(RouteNotViaTunnel, match="leaves by lo"):
        await guarded.print("ip/address")


def _refusals(device: str) -> float:
    value = REGISTRY.get_sample_value("wl_route_guard_refusals_total", {"device": device, "reason": "other_interface"})
    return value or 0.0
