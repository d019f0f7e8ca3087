"""Device drivers: one small interface (:class:`Driver`), and the RouterOS implementation over either the REST API
(v7, here) or the binary API (v6, ``_routeros_api``).

Every action is look-up, change, verify, and never keeps a ``.id`` beyond one round: ids change when a router
reboots. When a change fails because someone (or a reboot) got there first ("already have such entry",
"no such item"), the round goes on to verify: if the device is now as wanted, that is success.

Errors are classified once, here: :class:`TransientDeviceError` (timeouts, refused or reset connections, 5xx,
a verify that keeps failing) is worth retrying with backoff; :class:`PermanentDeviceError` (bad credentials,
a TLS certificate that does not verify, an entry the device rejects, a PPP secret it does not have) is not.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx

from ._store import Device, Method

Observed = Literal["active", "suspended", "partial"]
ROUNDS = 3  # look-up/change/verify rounds before a device that keeps changing under us counts as a failure
# Entries this system creates carry this comment prefix; with a device's own_entries_only (the default) restore
# removes only those, and reports any other entry that still blocks the customer.
OWN_COMMENT = "wl-workers"
Guard = Callable[[], Awaitable[None]]


class DeviceError(Exception):
    kind: Literal["transient", "permanent"]

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientDeviceError(DeviceError):
    kind = "transient"


class PermanentDeviceError(DeviceError):
    kind = "permanent"


class ForeignEntryError(PermanentDeviceError):
    """The customer is still blocked by an address-list entry this system did not create (not removed)."""


@dataclass(frozen=True)
class DeviceState:
    """What the device says about one customer now. ``partial``: a PPP secret disabled while a session of it is
    still up (a suspension that did not finish)."""

    state: Observed
    detail: str
    foreign: bool = False  # suspended only by an entry this system did not create (restore will not remove it)


class Driver(Protocol):
    async def ensure_active(self, method: Method, target: str) -> None: ...

    async def ensure_suspended(self, method: Method, target: str) -> None: ...

    async def read_state(self, method: Method, target: str) -> DeviceState: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Timeouts:
    connect: float = 3.0
    read: float = 10.0


class MenuApi(Protocol):
    """The four RouterOS menu operations the logic needs, whatever the transport.

    ``add`` treats "already have such entry" as done; ``set`` answers ``False`` when the item is gone (look it
    up again); ``remove`` treats "no such item" as done. Everything else the device refuses is permanent."""

    async def print(self, menu: str, **filters: str) -> list[dict[str, str]]: ...

    async def add(self, menu: str, values: dict[str, str]) -> None: ...

    async def set(self, menu: str, item_id: str, values: dict[str, str]) -> bool: ...

    async def remove(self, menu: str, item_id: str) -> None: ...

    async def aclose(self) -> None: ...


def make_driver(device: Device, password: str, timeouts: Timeouts | None = None, *, guard: Guard | None = None) -> RouterOs:
    """``guard`` is awaited before and after every write (add, set, remove): the job's lock check, which raises
    when the locks that made the write safe are gone."""
    timeouts = timeouts or Timeouts()
    api: MenuApi
    if device.driver == "routeros-rest":
        api = RestApi(device, password, timeouts)
    elif device.driver == "routeros-api":
        from ._routeros_api import BinaryApi

        api = BinaryApi(device, password, timeouts)
    else:
        raise PermanentDeviceError(f"device {device.name}: unknown driver {device.driver!r}")
    from .route_guard import guard as route_guard  # imports this module: imported here, not at the top

    api = route_guard(api, device=device.name, host=device.host)
    if guard is not None:
        api = GuardedApi(api, guard)
    return RouterOs(api, device.address_list, own_entries_only=getattr(device, "own_entries_only", True))


def _tls(device: Device) -> ssl.SSLContext | bool:
    if device.scheme != "https":
        return False
    if device.tls_insecure:
        return False
    try:
        return ssl.create_default_context(cafile=device.ca_file) if device.ca_file else ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise PermanentDeviceError(f"cannot load CA file {device.ca_file}: {exc}") from exc


def _is_cert_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def classify_transport_error(exc: httpx.HTTPError) -> DeviceError:
    if isinstance(exc, httpx.TimeoutException):
        return TransientDeviceError(f"timeout ({type(exc).__name__})")
    if _is_cert_error(exc):
        return PermanentDeviceError(f"TLS certificate does not verify: {exc}")
    if isinstance(exc, httpx.TransportError):  # refused, reset, dropped, protocol errors
        return TransientDeviceError(f"connection failed ({type(exc).__name__}: {exc or 'no detail'})")
    return PermanentDeviceError(f"request failed ({type(exc).__name__}: {exc})")


class _Rejected(Exception):
    """A 400/404 answer, for the caller to judge (already there / already gone / really rejected)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("message") or body)[:200]
    return str(body)[:200]


class RestApi:
    """RouterOS 7 REST API: ``/rest/...`` over HTTPS (CA file per device, or an explicit insecure switch) or HTTP."""

    def __init__(self, device: Device, password: str, timeouts: Timeouts) -> None:
        self._client = httpx.AsyncClient(
            base_url=device.base_url + "/rest",
            auth=httpx.BasicAuth(device.username, password),
            verify=_tls(device),
            timeout=httpx.Timeout(timeouts.read, connect=timeouts.connect),
            headers={"Accept": "application/json"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- HTTP -----------------------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, *, params: dict[str, str] | None = None, body: dict[str, str] | None = None) -> Any:
        try:
            response = await self._client.request(method, path, params=params, json=body)
        except httpx.HTTPError as exc:
            raise classify_transport_error(exc) from exc
        status = response.status_code
        if 200 <= status < 300:
            if not response.content:
                return None
            try:
                return response.json()
            except ValueError as exc:
                # a proxy's or captive portal's HTML page, a truncated body: not the router's REST API answering
                kind = response.headers.get("content-type", "no content type")
                raise TransientDeviceError(f"device answered HTTP {status} with a body that is not JSON ({kind}): {response.text[:80]!r}") from exc
        detail = _detail(response)
        if status in (401, 403):
            raise PermanentDeviceError(f"authentication failed (HTTP {status}): check the device's username and password")
        if status >= 500 or status in (408, 429):
            raise TransientDeviceError(f"device answered HTTP {status}: {detail}")
        if status in (400, 404):
            raise _Rejected(status, detail)
        raise PermanentDeviceError(f"device answered HTTP {status}: {detail}")

    async def print(self, menu: str, **filters: str) -> list[dict[str, str]]:
        try:
            result = await self._call("GET", f"/{menu}", params=filters)
        except _Rejected as exc:  # a read the router refuses: wrong menu (an old RouterOS), or something in between
            raise PermanentDeviceError(f"device refused to list {menu} (HTTP {exc.status}): {exc.detail}") from exc
        if not isinstance(result, list):
            raise PermanentDeviceError(f"unexpected answer to GET /{menu}: {type(result).__name__}")
        return [item for item in result if isinstance(item, dict)]

    @staticmethod
    def _item(menu: str, item_id: str) -> str:
        return f"/{menu}/{quote(item_id, safe='')}"

    async def set(self, menu: str, item_id: str, values: dict[str, str]) -> bool:
        """PATCH one item; ``False`` when it is gone (renumbered by a reboot, or removed): look it up again."""
        try:
            await self._call("PATCH", self._item(menu, item_id), body=values)
        except _Rejected as exc:
            if exc.status == 404 or "no such item" in exc.detail:
                return False
            raise PermanentDeviceError(f"device rejected the change of {menu}: {exc.detail}") from exc
        return True

    async def remove(self, menu: str, item_id: str) -> None:
        try:
            await self._call("DELETE", self._item(menu, item_id))
        except _Rejected as exc:
            if exc.status == 404 or "no such item" in exc.detail:
                return  # gone already: the verify decides
            raise PermanentDeviceError(f"device rejected the removal from {menu}: {exc.detail}") from exc

    async def add(self, menu: str, values: dict[str, str]) -> None:
        try:
            await self._call("PUT", f"/{menu}", body=values)
        except _Rejected as exc:
            if "already have such entry" in exc.detail:
                return  # added concurrently: the verify decides
            raise PermanentDeviceError(f"device rejected the new entry in {menu}: {exc.detail}") from exc

class GuardedApi:
    """A :class:`MenuApi` that awaits ``guard`` before and after every write, and counts the writes."""

    def __init__(self, api: MenuApi, guard: Guard) -> None:
        self.api = api
        self.guard = guard
        self.writes = 0

    async def print(self, menu: str, **filters: str) -> list[dict[str, str]]:
        return await self.api.print(menu, **filters)

    async def add(self, menu: str, values: dict[str, str]) -> None:
        await self.guard()
        self.writes += 1
        await self.api.add(menu, values)
        await self.guard()

    async def set(self, menu: str, item_id: str, values: dict[str, str]) -> bool:
        await self.guard()
        self.writes += 1
        result = await self.api.set(menu, item_id, values)
        await self.guard()
        return result

    async def remove(self, menu: str, item_id: str) -> None:
        await self.guard()
        self.writes += 1
        await self.api.remove(menu, item_id)
        await self.guard()

    async def aclose(self) -> None:
        await self.api.aclose()


def address_menu(target: str) -> str:
    """RouterOS keeps IPv6 address lists in a menu of their own."""
    return "ipv6/firewall/address-list" if ":" in target else "ip/firewall/address-list"


def _network_key(address: str) -> str | None:
    try:
        return str(ipaddress.ip_network(address, strict=False))
    except ValueError:
        return None


def _same_network(entry_address: str, target: str) -> bool:
    try:
        return ipaddress.ip_network(entry_address, strict=False) == ipaddress.ip_network(target, strict=False)
    except ValueError:
        return False


def is_own(entry: dict[str, str]) -> bool:
    return entry.get("comment", "").startswith(OWN_COMMENT)


class RouterOs:
    """The RouterOS logic of both methods, over either API (REST or binary): look-up, change, verify."""

    def __init__(self, api: MenuApi, list_name: str, *, own_entries_only: bool = True) -> None:
        self.api = api
        self.list_name = list_name
        self.own_entries_only = own_entries_only

    @property
    def writes(self) -> int:
        return self.api.writes if isinstance(self.api, GuardedApi) else 0

    async def aclose(self) -> None:
        await self.api.aclose()

    # -- address-list method ---------------------------------------------------------------------------------

    async def _entries(self, address: str) -> list[dict[str, str]]:
        """Every entry of our list for this address or prefix, enabled or not. IPv4 is filtered by the router
        (it writes hosts without /32); IPv6 by us, since the router may write a host with or without /128."""
        menu = address_menu(address)
        if menu.startswith("ipv6"):
            entries = await self.api.print(menu, list=self.list_name)
        else:
            entries = await self.api.print(menu, list=self.list_name, address=address)
        return [e for e in entries if _same_network(e.get("address", ""), address)]

    async def _listed(self, address: str) -> list[dict[str, str]]:
        return [e for e in await self._entries(address) if e.get("disabled") != "true"]

    async def _suspend_address(self, address: str) -> None:
        menu = address_menu(address)
        for _ in range(ROUNDS):
            entries = await self._entries(address)
            if any(e.get("disabled") != "true" for e in entries):
                return
            own_disabled = [e for e in entries if is_own(e) or not self.own_entries_only]
            if own_disabled:
                await self.api.set(menu, own_disabled[0][".id"], {"disabled": "false"})
            else:
                await self.api.add(menu, {"list": self.list_name, "address": address, "comment": f"{OWN_COMMENT}: suspended"})
            if await self._listed(address):
                return
        raise TransientDeviceError(f"{address} is still not in address-list {self.list_name} after {ROUNDS} rounds")

    async def _restore_address(self, address: str) -> None:
        menu = address_menu(address)
        for _ in range(ROUNDS):
            entries = await self._listed(address)
            if not entries:
                return
            ours = [e for e in entries if is_own(e) or not self.own_entries_only]
            if not ours:
                comments = ", ".join(repr(e.get("comment", "")) for e in entries)
                raise ForeignEntryError(
                    f"{address} is still blocked in address-list {self.list_name} by an entry this system did not create "
                    f"(comment {comments}); not removed: the device keeps own_entries_only"
                )
            for entry in ours:
                await self.api.remove(menu, entry[".id"])
            if not await self._listed(address):
                return
        raise TransientDeviceError(f"{address} is still in address-list {self.list_name} after {ROUNDS} rounds")

    # -- PPPoE method ----------------------------------------------------------------------------------------

    async def _secret(self, user: str) -> dict[str, str]:
        secrets = await self.api.print("ppp/secret", name=user)
        if not secrets:
            raise PermanentDeviceError(f"the device has no PPP secret named {user!r}")
        return secrets[0]

    async def _sessions(self, user: str) -> list[dict[str, str]]:
        return await self.api.print("ppp/active", name=user)

    async def _suspend_pppoe(self, user: str) -> None:
        for _ in range(ROUNDS):
            secret = await self._secret(user)
            if secret.get("disabled") != "true" and not await self.api.set("ppp/secret", secret[".id"], {"disabled": "true"}):
                continue
            # only after the secret is disabled: a session removed earlier could reconnect at once
            for session in await self._sessions(user):
                await self.api.remove("ppp/active", session[".id"])
            if (await self._secret(user)).get("disabled") == "true" and not await self._sessions(user):
                return
        raise TransientDeviceError(f"PPP user {user!r} is still not fully suspended after {ROUNDS} rounds")

    async def _restore_pppoe(self, user: str) -> None:
        for _ in range(ROUNDS):
            secret = await self._secret(user)
            if secret.get("disabled") == "true" and not await self.api.set("ppp/secret", secret[".id"], {"disabled": "false"}):
                continue
            if (await self._secret(user)).get("disabled") != "true":
                return
        raise TransientDeviceError(f"PPP secret {user!r} is still disabled after {ROUNDS} rounds")

    # -- interface -------------------------------------------------------------------------------------------

    async def ensure_suspended(self, method: Method, target: str) -> None:
        if method == "address-list":
            await self._suspend_address(target)
        else:
            await self._suspend_pppoe(target)

    async def ensure_active(self, method: Method, target: str) -> None:
        if method == "address-list":
            await self._restore_address(target)
        else:
            await self._restore_pppoe(target)

    async def read_state(self, method: Method, target: str) -> DeviceState:
        if method == "address-list":
            return _address_state(await self._listed(target), target, self.list_name)
        secret = await self._secret(target)
        return _pppoe_state(secret, len(await self._sessions(target)), target)

    async def snapshot(self, methods: set[str]) -> Snapshot:
        """Everything reconcile needs from this router in at most four reads, whatever the number of customers."""
        snap = Snapshot()
        if "address-list" in methods:
            for menu in ("ip/firewall/address-list", "ipv6/firewall/address-list"):
                try:
                    entries = await self.api.print(menu, list=self.list_name)
                except PermanentDeviceError:
                    if menu.startswith("ipv6"):  # a router without IPv6: no IPv6 customer can be listed there
                        continue
                    raise
                for entry in entries:
                    key = _network_key(entry.get("address", ""))
                    if entry.get("disabled") != "true" and key is not None:
                        snap.entries.setdefault(key, []).append(entry)
        if "pppoe" in methods:
            snap.secrets = {s.get("name", ""): s for s in await self.api.print("ppp/secret")}
            for session in await self.api.print("ppp/active"):
                snap.sessions[session.get("name", "")] = snap.sessions.get(session.get("name", ""), 0) + 1
        return snap

    def state_in(self, snap: Snapshot, method: Method, target: str) -> DeviceState:
        if method == "address-list":
            return _address_state(snap.entries.get(_network_key(target) or target, []), target, self.list_name)
        secret = snap.secrets.get(target)
        if secret is None:
            raise PermanentDeviceError(f"the device has no PPP secret named {target!r}")
        return _pppoe_state(secret, snap.sessions.get(target, 0), target)


@dataclass
class Snapshot:
    # enabled entries of our address-list (v4 + v6), by canonical network: one look-up per customer
    entries: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)


def _address_state(listed: list[dict[str, str]], target: str, list_name: str) -> DeviceState:
    if not listed:
        return DeviceState("active", f"{target} is not in address-list {list_name}")
    if not any(is_own(e) for e in listed):
        comments = ", ".join(repr(e.get("comment", "")) for e in listed)
        return DeviceState("suspended", f"{target} is in address-list {list_name} by an entry this system did not create (comment {comments})", foreign=True)
    return DeviceState("suspended", f"{target} is in address-list {list_name}")


def _pppoe_state(secret: dict[str, str], sessions: int, target: str) -> DeviceState:
    if secret.get("disabled") != "true":
        return DeviceState("active", f"PPP secret {target} enabled, {sessions} session(s)")
    if sessions:
        return DeviceState("partial", f"PPP secret {target} disabled but {sessions} session(s) still up")
    return DeviceState("suspended", f"PPP secret {target} disabled, no session")
