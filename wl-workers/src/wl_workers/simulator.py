"""A RouterOS simulator: a real HTTP server on 127.0.0.1 speaking the REST API of RouterOS 7 (and, with
``api=True``, a TCP server speaking the binary API of port 8728 over the same state), for tests and the local
system.

It speaks the subset wl-workers uses, the way RouterOS does: Basic auth, every value a string, ``.id`` values
like ``*1A`` that change after a reboot, ``GET`` with query-string filters, ``PUT`` (add), ``PATCH`` (set),
``DELETE`` (remove), and RouterOS's error bodies (``{"error": 400, "message": "Bad Request", "detail": ...}``).
Menus: ``/rest/ip/firewall/address-list``, ``/rest/ppp/secret``, ``/rest/ppp/active``.

Faults, from a test (``sim.faults``, ``sim.reboot()``, ``sim.go_down()``) or over HTTP (``POST /__sim__/control``):
slow answers, 5xx answers, dropped connections, a reboot (ids renumbered, dynamic entries and sessions gone),
a reboot just before the next request of a given method (to land between a look-up and a change), and down
(connections refused). The server is the standard library's threading HTTP server: no dependency, starts in
milliseconds.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

logger = logging.getLogger(__name__)

MENUS = ("ip/firewall/address-list", "ipv6/firewall/address-list", "ppp/secret", "ppp/active")
# (service id, method, target, desired state) of the demo: `simulate-router --seed-demo` and `demo-seed`
DEMO_CUSTOMERS = (
    ("cust-1001", "address-list", "10.20.0.11", "active"),
    ("cust-1002", "address-list", "10.20.0.12", "active"),
    ("cust-1003", "address-list", "10.20.0.13", "suspended"),
    ("cust-2001", "pppoe", "pppoe-2001", "active"),
    ("cust-2002", "pppoe", "pppoe-2002", "active"),
)
# Fields an item gets when added without them (RouterOS fills these in).
_DEFAULTS: dict[str, dict[str, str]] = {
    "ip/firewall/address-list": {"disabled": "false", "dynamic": "false", "comment": ""},
    "ipv6/firewall/address-list": {"disabled": "false", "dynamic": "false", "comment": ""},
    "ppp/secret": {"disabled": "false", "service": "any", "profile": "default", "comment": ""},
    "ppp/active": {"service": "pppoe", "caller-id": "", "uptime": "0s", "encoding": "", "radius": "false"},
}
_API_VERBS = {"print": "GET", "add": "PUT", "set": "PATCH", "remove": "DELETE"}
_REQUIRED = {"ip/firewall/address-list": ("list", "address"), "ipv6/firewall/address-list": ("list", "address"), "ppp/secret": ("name",), "ppp/active": ("name",)}


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _error(status: int, detail: str | None = None) -> _Reply:
    message = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    body: dict[str, Any] = {"error": status, "message": message}
    if detail:
        body["detail"] = detail
    return _Reply(status, body)


def _as_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return str(value)


@dataclass
class Faults:
    """What the simulated router does wrong. Counters count down per request; 0 means off."""

    delay: float = 0.0  # seconds added to every answer
    method_delay: dict[str, float] = field(default_factory=dict)  # method -> seconds added to its answers (e.g. a slow PUT)
    html_next: int = 0  # answer this many requests 200 with an HTML page (a proxy or captive portal in between)
    fail_next: int = 0  # answer this many requests with ``fail_status``
    fail_status: int = 503
    drop_next: int = 0  # close this many connections without an answer
    reboot_before: dict[str, int] = field(default_factory=dict)  # method -> reboots before its next requests


@dataclass
class RequestRecord:
    method: str
    path: str
    status: int
    key: str


class RouterSimulator:
    """One simulated router. ``start()`` listens on 127.0.0.1 (port 0 = any free port)."""

    def __init__(
        self, *, username: str = "admin", password: str = "", host: str = "127.0.0.1", port: int = 0, identity: str = "sim-router", api: bool = False, api_port: int = 0
    ) -> None:
        self.api = api
        self.api_port = api_port
        self._api_server: _ApiServer | None = None
        self.username = username
        self.password = password
        self.host = host
        self.port = port
        self.identity = identity
        self.faults = Faults()
        # called (method, path) before each REST request is served: tests use it to change the router "by hand"
        # at an exact moment, e.g. between a driver's look-up and its change
        self.before_request: Callable[[str, str], None] | None = None
        self.requests: list[RequestRecord] = []
        self.reboots = 0
        self._items: dict[str, list[dict[str, str]]] = {menu: [] for menu in MENUS}
        self._next_id = 1
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._in_flight = 0
        self._in_flight_by_key: dict[str, int] = {}
        self.in_flight_by_method: dict[str, int] = {}  # requests being answered now, by HTTP method
        self._connections: set[socket.socket] = set()
        self.max_in_flight = 0
        self.max_in_flight_per_key = 0

    # -- lifecycle ------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> RouterSimulator:
        sim = self

        class Handler(_Handler):
            simulator = sim

        server = _Server((self.host, self.port), Handler)
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"routeros-sim-{self.port}", daemon=True)
        self._thread.start()
        if self.api:

            class ApiHandler(_ApiHandler):
                simulator = sim

            api_server = _ApiServer((self.host, self.api_port), ApiHandler)
            self.api_port = int(api_server.server_address[1])
            self._api_server = api_server
            threading.Thread(target=api_server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"routeros-sim-api-{self.api_port}", daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        api_server, self._api_server = self._api_server, None
        if api_server is not None:
            api_server.shutdown()
            api_server.server_close()
        # kept-alive connections would otherwise go on being served by their threads: a router that is down
        # answers nothing, on old connections too
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    go_down = stop

    def come_up(self) -> None:
        """Listen again on the same port (after ``go_down``)."""
        if self._server is None:
            self.start()

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def __enter__(self) -> RouterSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------------------------

    def _new_id(self) -> str:
        value = f"*{self._next_id:X}"
        self._next_id += 1
        return value

    def add(self, menu: str, **fields: Any) -> dict[str, str]:
        """Add an item directly (as an operator on the console would); returns it."""
        with self._lock:
            try:
                return dict(self._add(menu, {k.replace("_", "-"): v for k, v in fields.items()}))
            except _Reply as reply:
                raise ValueError(str(reply.body)) from None

    def _add(self, menu: str, fields: dict[str, Any]) -> dict[str, str]:
        values = {k: _as_string(v) for k, v in fields.items() if k != ".id"}
        for name in _REQUIRED[menu]:
            if not values.get(name):
                raise _error(400, f"failure: missing value of {name}")
        items = self._items[menu]
        if menu == "ipv6/firewall/address-list" and "/" not in values["address"]:
            values["address"] += "/128"  # as RouterOS 7 writes an IPv6 host
        if menu.endswith("firewall/address-list") and any(i["list"] == values["list"] and i["address"] == values["address"] for i in items):
            raise _error(400, "failure: already have such entry")
        if menu == "ppp/secret" and any(i["name"] == values["name"] for i in items):
            raise _error(400, "failure: secret with the same name already exists")
        item = {".id": self._new_id(), **_DEFAULTS[menu], **values}
        items.append(item)
        return item

    def items(self, menu: str, **filters: str) -> list[dict[str, str]]:
        with self._lock:
            return [dict(i) for i in self._items[menu] if all(i.get(k.replace("_", "-")) == v for k, v in filters.items())]

    def remove_where(self, menu: str, **filters: str) -> int:
        """Remove matching items directly (as an operator would); returns how many."""
        with self._lock:
            keep = [i for i in self._items[menu] if not all(i.get(k.replace("_", "-")) == v for k, v in filters.items())]
            removed = len(self._items[menu]) - len(keep)
            self._items[menu] = keep
            return removed

    def set_where(self, menu: str, filters: dict[str, str], **values: Any) -> int:
        with self._lock:
            count = 0
            for item in self._items[menu]:
                if all(item.get(k) == v for k, v in filters.items()):
                    item.update({k.replace("_", "-"): _as_string(v) for k, v in values.items()})
                    count += 1
            return count

    def is_suspended_address(self, address: str, list_name: str = "morosos") -> bool:
        return any(i.get("disabled") != "true" for i in self.items("ip/firewall/address-list", list=list_name, address=address))

    def reboot(self) -> None:
        """What a reboot does to the state we use: ids renumbered, dynamic address-list entries (those with a
        timeout) and PPP sessions gone."""
        with self._lock:
            self.reboots += 1
            self._next_id = 0x100 * (self.reboots + 1) + 1
            self._items["ip/firewall/address-list"] = [i for i in self._items["ip/firewall/address-list"] if not i.get("timeout")]
            self._items["ppp/active"] = []
            for menu in MENUS:
                for item in self._items[menu]:
                    item[".id"] = self._new_id()

    def seed_demo(self) -> None:
        """The demo customers (``DEMO_CUSTOMERS``): PPPoE users with a secret and a session each, and the
        suspended address-list customer in ``morosos``."""
        for number, (_sid, method, target, desired) in enumerate(DEMO_CUSTOMERS):
            if method == "pppoe":
                self.add("ppp/secret", name=target, password="", service="pppoe", profile="default", disabled=desired == "suspended")
                if desired == "active":
                    self.add("ppp/active", name=target, address=f"10.30.0.{number + 1}", caller_id=f"AA:BB:CC:00:00:{number:02X}")
            elif desired == "suspended":
                self.add("ip/firewall/address-list", list="morosos", address=target, comment="wl-workers: suspended")  # as if this system had suspended it

    # -- request handling (called from the server's threads) -------------------------------------------------

    @contextlib.contextmanager
    def _tracking(self, key: str, method: str = "") -> Iterator[None]:
        with self._lock:
            self.in_flight_by_method[method] = self.in_flight_by_method.get(method, 0) + 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            if key:
                self._in_flight_by_key[key] = self._in_flight_by_key.get(key, 0) + 1
                self.max_in_flight_per_key = max(self.max_in_flight_per_key, self._in_flight_by_key[key])
        try:
            yield
        finally:
            with self._lock:
                self.in_flight_by_method[method] -= 1
                self._in_flight -= 1
                if key:
                    self._in_flight_by_key[key] -= 1

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_in_flight = 0
            self.max_in_flight_per_key = 0

    def _take_fault(self, method: str) -> str | None:
        with self._lock:
            f = self.faults
            if f.drop_next > 0:
                f.drop_next -= 1
                return "drop"
            if f.fail_next > 0:
                f.fail_next -= 1
                return "fail"
            if f.html_next > 0:
                f.html_next -= 1
                return "html"
            if f.reboot_before.get(method, 0) > 0:
                f.reboot_before[method] -= 1
                self.reboot()
            return None

    def handle(self, method: str, path: str, query: str, body: Any) -> tuple[int, Any]:
        if not path.startswith("/rest/"):
            raise _error(404)
        rest = path[len("/rest/") :].strip("/")
        menu = next((m for m in MENUS if rest == m or rest.startswith(m + "/")), None)
        if menu is None:
            if rest == "system/identity" and method == "GET":
                return 200, {"name": self.identity}
            raise _error(400, "no such command or directory (" + rest + ")")
        item_id = unquote(rest[len(menu) + 1 :]) if rest != menu else None
        with self._lock:
            if method == "GET":
                return self._get(menu, item_id, query)
            if method == "PUT" and item_id is None:
                if not isinstance(body, dict):
                    raise _error(400, "failure: expected a JSON object")
                return 201, dict(self._add(menu, body))
            if method in ("PATCH", "DELETE") and item_id is not None:
                item = self._find(menu, item_id)
                if method == "DELETE":
                    self._items[menu].remove(item)
                    return 204, None
                if not isinstance(body, dict):
                    raise _error(400, "failure: expected a JSON object")
                item.update({k: _as_string(v) for k, v in body.items() if k != ".id"})
                return 200, dict(item)
            raise _error(400, f"no such command ({method} {rest})")

    def _find(self, menu: str, item_id: str) -> dict[str, str]:
        for item in self._items[menu]:
            if item[".id"] == item_id:
                return item
        raise _error(404, "no such item")

    def _get(self, menu: str, item_id: str | None, query: str) -> tuple[int, Any]:
        if item_id is not None:
            return 200, dict(self._find(menu, item_id))
        filters = dict(parse_qsl(query, keep_blank_values=True))
        filters.pop(".proplist", None)
        return 200, [dict(i) for i in self._items[menu] if all(i.get(k) == v for k, v in filters.items())]

    def api_command(self, words: list[str], session: dict[str, str]) -> list[list[str]] | None:
        """One binary-API sentence; the reply sentences, or ``None`` to drop the connection."""
        command, args = words[0], words[1:]
        attrs = {k: v for k, _, v in (w[1:].partition("=") for w in args if w.startswith("="))}
        queries = {k: v for k, _, v in (w[1:].partition("=") for w in args if w.startswith("?"))}
        if command == "/login":
            if attrs.get("name") == self.username and attrs.get("password") == self.password:
                session["user"] = self.username
                return [["!done"]]
            return [["!trap", "=message=invalid user name or password (6)"], ["!done"]]
        if "user" not in session:
            return [["!fatal", "not logged in"]]
        path, _, verb = command.rpartition("/")
        method = _API_VERBS.get(verb)
        menu = path.lstrip("/")
        key = queries.get("address") or queries.get("name") or attrs.get("address") or attrs.get("name") or ""
        status = 200
        try:
            with self._tracking(key, method or ""):
                delay = self.faults.delay + self.faults.method_delay.get(method or "", 0.0)
                if delay:
                    time.sleep(delay)
                fault = self._take_fault(method or "")
                if fault == "drop":
                    status = 0
                    return None
                if fault == "fail":
                    status = 500
                    return [["!fatal", "simulated failure"]]
                if method is None:
                    raise _error(400, f"no such command ({command})")
                if self.before_request is not None:
                    self.before_request(method, f"/rest/{menu}")
                return self._api_reply(method, menu, attrs, queries)
        except _Reply as reply:
            status = reply.status
            detail = reply.body.get("detail") or reply.body.get("message") if isinstance(reply.body, dict) else str(reply.body)
            return [["!trap", f"=message={detail}"], ["!done"]]
        finally:
            with self._lock:
                self.requests.append(RequestRecord(method or "?", f"api:{command}", status, key))

    def _api_reply(self, method: str, menu: str, attrs: dict[str, str], queries: dict[str, str]) -> list[list[str]]:
        if method == "GET":
            _, items = self.handle("GET", f"/rest/{menu}", urlencode(queries), None)
            return [["!re", *(f"={k}={v}" for k, v in item.items())] for item in items] + [["!done"]]
        if method == "PUT":
            _, item = self.handle("PUT", f"/rest/{menu}", "", attrs)
            return [["!done", f"=ret={item['.id']}"]]
        item_id = attrs.pop(".id", "")
        self.handle(method, f"/rest/{menu}/{quote(item_id, safe='')}", "", attrs if method == "PATCH" else None)
        return [["!done"]]

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return user == self.username and password == self.password

    def control(self, command: dict[str, Any]) -> dict[str, Any]:
        """The control endpoint: ``{"action": "slow", "seconds": 1}``, ``fail`` (count, status), ``drop``
        (count), ``reboot``, ``down`` (seconds: comes back after them), ``reset``, ``state``."""
        action = command.get("action")
        with self._lock:
            if action == "slow":
                self.faults.delay = float(command.get("seconds", 1.0))
            elif action == "fail":
                self.faults.fail_next, self.faults.fail_status = int(command.get("count", 1)), int(command.get("status", 503))
            elif action == "drop":
                self.faults.drop_next = int(command.get("count", 1))
            elif action == "reboot":
                self.reboot()
            elif action == "reset":
                self.faults = Faults()
            elif action == "down":
                seconds = float(command.get("seconds", 5.0))
                threading.Thread(target=self._down_for, args=(seconds,), daemon=True).start()
            elif action != "state":
                raise _error(400, f"unknown action {action!r}")
            return {"menus": {m: [dict(i) for i in self._items[m]] for m in MENUS}, "reboots": self.reboots}

    def _down_for(self, seconds: float) -> None:
        time.sleep(0.05)  # let the control request's answer go out first
        self.go_down()
        time.sleep(seconds)
        self.come_up()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # clients that gave up (timeouts, drops) are part of the game; anything else is logged
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        logger.exception("sim_request_failed", extra={"event": "sim_request_failed", "client": client_address})


def _request_key(query: str, body: Any) -> str:
    """Which customer a request concerns (address or PPP name), for the per-customer concurrency count."""
    values = dict(parse_qsl(query))
    if isinstance(body, dict):
        values.update({k: _as_string(v) for k, v in body.items()})
    return values.get("address") or values.get("name") or ""


class _Handler(BaseHTTPRequestHandler):
    simulator: RouterSimulator
    protocol_version = "HTTP/1.1"
    server_version = "RouterOS-sim"
    # headers and body go out in separate writes: with Nagle's algorithm on, they meet the client's delayed ACK
    # and every answer takes 40 ms more than the router's own time
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.simulator._lock:
            self.simulator._connections.add(self.connection)

    def finish(self) -> None:
        with self.simulator._lock:
            self.simulator._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("sim_request", extra={"event": "sim_request", "line": format % args})

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_POST(self) -> None:
        self._serve("POST")

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise _error(400, "failure: invalid JSON") from exc

    def _serve(self, method: str) -> None:
        sim = self.simulator
        split = urlsplit(self.path)
        status, payload, key = 500, None, ""
        try:
            body = self._body()
            if split.path == "/__sim__/control" and method == "POST":
                status, payload = 200, sim.control(body if isinstance(body, dict) else {})
                self._send(status, payload)
                return
            key = _request_key(split.query, body)
            with sim._tracking(key, method):
                delay = sim.faults.delay + sim.faults.method_delay.get(method, 0.0)
                if delay:
                    time.sleep(delay)
                fault = sim._take_fault(method)
                if fault == "html":
                    status = 200
                    self._send_raw(200, b"<html><body>Login required</body></html>", "text/html")
                    return
                if fault == "drop":
                    status = 0
                    self._drop()
                    return
                if fault == "fail":
                    raise _error(sim.faults.fail_status, "simulated failure")
                if not sim.authorized(self.headers.get("Authorization")):
                    raise _error(401)
                if sim.before_request is not None:
                    sim.before_request(method, split.path)
                status, payload = sim.handle(method, split.path, split.query, body)
        except _Reply as reply:
            status, payload = reply.status, reply.body
        finally:
            with sim._lock:
                sim.requests.append(RequestRecord(method, split.path, status, key))
        self._send(status, payload)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_raw(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send(self, status: int, payload: Any) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="RouterOS"')
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)


class _ApiServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        logger.exception("sim_api_request_failed", extra={"event": "sim_api_request_failed", "client": client_address})


def _read_word_length(stream: Any) -> int:
    first: bytes = stream.read(1)
    if not first:
        raise EOFError
    byte = first[0]
    extra = 0 if byte < 0x80 else 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
    rest: bytes = stream.read(extra) if extra else b""
    if len(rest) != extra:
        raise EOFError
    if byte == 0xF0:
        return int.from_bytes(bytes(rest), "big")
    value: int = byte & (0x7F, 0x3F, 0x1F, 0x0F)[extra]
    for b in rest:
        value = (value << 8) | b
    return value


class _ApiHandler(socketserver.StreamRequestHandler):
    """The RouterOS binary API (8728) over the same state as the REST side."""

    simulator: RouterSimulator

    def setup(self) -> None:
        super().setup()
        with self.simulator._lock:
            self.simulator._connections.add(self.connection)

    def finish(self) -> None:
        with self.simulator._lock:
            self.simulator._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _sentence(self) -> list[str]:
        words: list[str] = []
        while True:
            length = _read_word_length(self.rfile)
            if length == 0:
                return words
            data = self.rfile.read(length)
            if len(data) != length:
                raise EOFError
            words.append(data.decode(errors="replace"))

    def handle(self) -> None:
        from ._routeros_api import encode_sentence

        session: dict[str, str] = {}
        while True:
            try:
                words = self._sentence()
            except (EOFError, OSError):
                return
            if not words:
                continue
            replies = self.simulator.api_command(words, session)
            if replies is None:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            with contextlib.suppress(OSError):
                self.wfile.write(b"".join(encode_sentence(r) for r in replies))
            if replies and replies[0][0] == "!fatal":
                return


def serve(host: str, port: int, username: str, password: str, *, seed_demo: bool = False, api_port: int | None = None) -> None:
    """Run a simulator in the foreground until interrupted (``wl-workers simulate-router``)."""
    sim = RouterSimulator(username=username, password=password, host=host, port=port, api=api_port is not None, api_port=api_port or 0)
    if seed_demo:
        sim.seed_demo()
    sim.start()
    logger.info("simulator_listening", extra={"event": "simulator_listening", "url": sim.url, "seeded": seed_demo})
    api = f", binary API on {host}:{sim.api_port}" if sim.api else ""
    print(f"RouterOS simulator on {sim.url}{api} (user {username}); control: POST {sim.url}/__sim__/control", flush=True)
    # SIGTERM (a service manager, a test) stops it like Ctrl-C; SIGINT alone is ignored in background jobs.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        sim.stop()
