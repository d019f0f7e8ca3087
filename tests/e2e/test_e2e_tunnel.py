"""The harness proven with plain HTTP: a device address answers through the tunnel, and only through it."""

from __future__ import annotations

import errno

import pytest

from tests.e2e.tunnel import DEVICE_IP, ENTRYPOINT, Tunnel, wait_until

pytestmark = pytest.mark.slow
URL = f"http://{DEVICE_IP}:8080/"


def test_device_answers_only_through_the_tunnel(tunnel: Tunnel) -> None:
    (tunnel.workdir / "index.html").write_text("router")
    tunnel.serve_http()
    # Before the tunnel exists, the vpn namespace has no route to the device.
    before = tunnel.probe(tunnel.vpn_ns, URL)
    assert before["errno"] == errno.ENETUNREACH, before
    assert not tunnel.healthy()

    tunnel.start_wireguard()
    wait_until(tunnel.healthy, what="a handshake (the wireguard healthcheck)")
    assert not tunnel.healthy(max_age=-1), "a handshake older than the limit is unhealthy"
    through = tunnel.probe(tunnel.vpn_ns, URL)
    assert through == {"ok": True, "status": 200, "body": "router"}

    # A container outside the VPN namespace (payment-webhook's view) cannot reach it.
    outside = tunnel.probe(tunnel.out_ns, URL)
    assert outside["ok"] is False and outside["errno"] == errno.ENETUNREACH, outside


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
