"""The harness proven with plain HTTP: a device address answers through the tunnel, and only through it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from tests.e2e.tunnel import (
    DEVICE_IP,
    ENTRYPOINT,
    OWNER,
    SITE_PORT,
    SITE_UNDERLAY_IP,
    VPN_LAN_IP,
    VPN_TUNNEL_IP,
    WG_ENV,
    Tunnel,
    read_line,
    sh,
    wait_until,
)

pytestmark = pytest.mark.slow
URL = f"http://{DEVICE_IP}:8080/"


def test_device_answers_only_through_the_tunnel(tunnel: Tunnel) -> None:
    (tunnel.workdir / "index.html").write_text("router")
    tunnel.serve_http()
    tunnel.start_owner()
    # Before the tunnel exists, the owner's unreachable route fails device traffic at once.
    before = tunnel.probe(tunnel.vpn_ns, URL)
    assert before["errno"] == errno.EHOSTUNREACH, before
    assert not tunnel.healthy()

    tunnel.start_wireguard()
    wait_until(tunnel.healthy, what="a handshake (the wireguard healthcheck)")
    assert not tunnel.healthy(max_age=-1), "a handshake older than the limit is unhealthy"
    through = tunnel.probe(tunnel.vpn_ns, URL)
    assert through == {"ok": True, "status": 200, "body": "router"}

    # A container outside the VPN namespace (payment-webhook's view) cannot reach it.
    outside = tunnel.probe(tunnel.out_ns, URL)
    assert outside["ok"] is False and outside["errno"] == errno.ENETUNREACH, outside
    assert tunnel.leaked() == 0


def test_site_not_answering_then_back(tunnel: Tunnel) -> None:
    tunnel.serve_http()
    tunnel.start_wireguard()
    wait_until(tunnel.healthy, what="a handshake")
    tunnel.set_site_link(up=False)
    silent = tunnel.probe(tunnel.vpn_ns, URL, timeout=1.0)
    assert silent["ok"] is False and "timed out" in silent["error"], silent
    tunnel.set_site_link(up=True)
    wait_until(lambda: tunnel.probe(tunnel.vpn_ns, URL, timeout=1.0)["ok"], what="the device again", timeout=30)


def test_wireguard_crash_fails_closed_and_restart_restores(tunnel: Tunnel) -> None:
    tunnel.serve_http()
    first = tunnel.start_wireguard()
    wait_until(tunnel.healthy, what="a handshake")
    assert tunnel.probe(tunnel.vpn_ns, URL)["ok"]

    tunnel.kill_vpn_wireguard_go()
    # The entrypoint notices that wg0 is gone and exits non-zero: the restart policy's cue.
    assert first.wait(timeout=20) == 1
    # The fallback route stays in the namespace: device traffic fails at once instead of taking another route.
    down = tunnel.probe(tunnel.vpn_ns, URL)
    assert down["errno"] == errno.EHOSTUNREACH, down
    assert not tunnel.healthy()

    tunnel.start_wireguard()  # what restart: unless-stopped does, in the same namespace
    wait_until(tunnel.healthy, what="a handshake after the restart")
    assert tunnel.probe(tunnel.vpn_ns, URL)["ok"]


def test_entrypoint_refuses_a_dns_line(tunnel: Tunnel) -> None:
    config = tunnel.client_config()
    config.write_text(config.read_text().replace("[Peer]", "DNS = 192.0.2.53\n\n[Peer]"))
    env = {"WG_CONFIG": str(config), "WG_INTERFACE": tunnel.vpn_if, "WG_RUN_DIR": str(tunnel.workdir / "run")}
    process = tunnel.popen(tunnel.vpn_ns, str(ENTRYPOINT), env=env)
    assert process.wait(timeout=20) == 78
    assert process.stdout is not None and "DNS =" in process.stdout.read()
    assert not tunnel.interface_up()


# -- fail closed from the namespace's first moment (issue 14 item 1): deploy/netns/owner.sh's unreachable routes
# and firewall. The vpn namespace's default route leads to the simulated compose network, which counts every
# packet for the device subnet (Tunnel.leaked): without the owner's routes such a packet goes there.


def test_without_the_owner_device_traffic_leaks_to_the_compose_network(tunnel: Tunnel) -> None:
    """The harness can see a leak: the deployment as it was (no owner routes, no tunnel) sends device traffic out
    of the compose network, where an impostor on the device address would get the router's credentials."""
    assert tunnel.leaked() == 0
    tunnel.probe(tunnel.vpn_ns, URL, timeout=0.5)
    assert tunnel.leaked() > 0


def test_owner_restart_fails_closed_then_the_tunnel_returns(tunnel: Tunnel) -> None:
    tunnel.serve_http()
    tunnel.start_owner()
    tunnel.start_wireguard()
    wait_until(tunnel.healthy, what="a handshake")
    assert tunnel.probe(tunnel.vpn_ns, URL)["ok"]

    # docker compose restart vpn-netns: a fresh namespace, wireguard not (yet) in it
    tunnel.restart_owner(owner=False)
    assert not _owner_healthy(tunnel), "healthy before owner.sh has run"
    tunnel.start_owner()
    assert _owner_healthy(tunnel)  # what wireguard and the workers wait for
    down = tunnel.probe(tunnel.vpn_ns, URL)
    assert down["errno"] == errno.EHOSTUNREACH, down
    assert tunnel.leaked() == 0

    tunnel.start_wireguard()  # restart: true brings wireguard into the new namespace
    wait_until(tunnel.healthy, what="a handshake in the new namespace")
    assert tunnel.probe(tunnel.vpn_ns, URL)["ok"]
    assert tunnel.leaked() == 0


def test_wireguard_failing_at_first_start_fails_closed(tunnel: Tunnel) -> None:
    tunnel.start_owner()
    config = tunnel.client_config()
    config.write_text(config.read_text().replace(tunnel.vpn_private, "not-a-key"))
    env = {**WG_ENV, "WG_CONFIG": str(config), "WG_INTERFACE": tunnel.vpn_if, "WG_RUN_DIR": str(tunnel.workdir / "run")}
    wireguard = tunnel.popen(tunnel.vpn_ns, str(ENTRYPOINT), env=env)
    assert wireguard.wait(timeout=20) != 0
    for _ in range(3):
        down = tunnel.probe(tunnel.vpn_ns, URL)
        assert down["errno"] == errno.EHOSTUNREACH, down
    assert tunnel.leaked() == 0


def test_owner_refuses_to_start_without_device_subnets(tunnel: Tunnel) -> None:
    for subnets in ("", "0.0.0.0/0"):
        config = tunnel.workdir / "empty.conf"
        config.write_text("[Interface]\n")
        env = {"WG_CONFIG": str(config), "WG_DEVICE_SUBNETS": subnets, "OWNER_ONESHOT": "1",
               "WG_READY_FILE": str(tunnel.workdir / "ready")}  # fmt: skip
        owner = tunnel.popen(tunnel.vpn_ns, str(OWNER), env=env)
        assert owner.wait(timeout=20) == 78
        assert not (tunnel.workdir / "ready").exists()


def test_nothing_answers_a_device_address_through_the_tunnel(tunnel: Tunnel) -> None:
    """issue 14 item 4: a listener on 0.0.0.0 of the vpn namespace (the workers' /metrics) answers loopback and the
    compose network, never a packet arriving on wg0; device calls made from the namespace still get their answers."""
    tunnel.serve_http()
    tunnel.start_owner()
    tunnel.start_wireguard()
    wait_until(tunnel.healthy, what="a handshake")
    listener = tunnel.popen(tunnel.vpn_ns, sys.executable, "-u", "-m", "http.server", "--bind", "0.0.0.0", "9480",
                            "--directory", str(tunnel.workdir))  # fmt: skip
    assert listener.stdout is not None and read_line(listener.stdout, timeout=15).startswith("Serving HTTP")
    assert tunnel.probe(tunnel.vpn_ns, "http://127.0.0.1:9480/")["ok"]  # the healthcheck's way in
    assert tunnel.probe(tunnel.lan_ns, f"http://{VPN_LAN_IP}:9480/")["ok"]  # Prometheus's way in
    connect = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({VPN_TUNNEL_IP!r}, 9480), timeout=2, source_address=({DEVICE_IP!r}, 0))\n"
        "    print('connected')\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    from_device = sh("ip", "netns", "exec", tunnel.site_ns, sys.executable, "-c", connect).strip()
    assert from_device == "TimeoutError", from_device  # dropped: no answer, not even a refusal
    assert tunnel.probe(tunnel.vpn_ns, URL)["ok"]  # the answers to our own calls still come in on wg0


def test_the_endpoint_is_set_again_from_the_config_while_the_peer_is_silent(tunnel: Tunnel) -> None:
    """issue 14 item 7: WireGuard resolves an Endpoint name once; the entrypoint sets it again from the config
    while a peer has no recent handshake, which resolves the name anew (here: an address it had lost)."""
    tunnel.start_owner()
    env = {**WG_ENV, "WG_CONFIG": str(tunnel.client_config()), "WG_INTERFACE": tunnel.vpn_if,
           "WG_RUN_DIR": str(tunnel.workdir / "run"), "WG_RERESOLVE_AFTER": "1", "WG_RERESOLVE_EVERY": "2"}  # fmt: skip
    tunnel.popen(tunnel.vpn_ns, str(ENTRYPOINT), env=env)
    wait_until(tunnel.interface_up, what="wg0 up")

    def endpoint() -> str:
        return sh("ip", "netns", "exec", tunnel.vpn_ns, "wg", "show", tunnel.vpn_if, "endpoints").split()[-1]

    wait_until(lambda: endpoint() == f"{SITE_UNDERLAY_IP}:{SITE_PORT}", what="the configured endpoint")
    sh("ip", "netns", "exec", tunnel.vpn_ns, "wg", "set", tunnel.vpn_if, "peer", tunnel.site_public,
       "endpoint", "192.0.2.9:51820")  # fmt: skip
    assert endpoint() == "192.0.2.9:51820"
    wait_until(lambda: endpoint() == f"{SITE_UNDERLAY_IP}:{SITE_PORT}", what="the endpoint set again from the config", timeout=30)


def _owner_healthy(tunnel: Tunnel) -> bool:
    """The vpn-netns service's healthcheck (deploy/netns/healthcheck.sh), run in its namespace."""
    env = {**os.environ, "WG_READY_FILE": str(tunnel.workdir / "owner.ready")}
    check = subprocess.run(["ip", "netns", "exec", tunnel.vpn_ns, str(OWNER.with_name("healthcheck.sh"))], env=env,
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    return check.returncode == 0
