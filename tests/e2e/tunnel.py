"""A WireGuard tunnel between network namespaces, as the compose stack has it, without Docker.

- ``<tag>-vpn`` plays the namespace of ``vpn-netns``: the real ``deploy/wireguard/entrypoint.sh`` brings the
  tunnel up there (wg-quick, falling back to wireguard-go), and processes started there are what
  ``network_mode: service:vpn-netns`` gives the workers.
- ``<tag>-site`` plays the ISP site: the remote WireGuard peer (wireguard-go) and the device address
  ``DEVICE_IP`` on its loopback, which exists nowhere else.
- ``<tag>-out`` plays a container outside the VPN (payment-webhook's view): loopback only.
- ``<tag>-lan`` plays the compose network seen from the vpn namespace: the vpn namespace's default route points
  there (TEST-NET-2), as Docker's does, and it counts every packet for the device subnet that arrives (nftables):
  a packet counted there is one that left by the wrong door (:meth:`Tunnel.leaked`).
The two ends talk over a veth pair with TEST-NET-1 addresses. Nothing leaves the test's namespaces: the LAN
namespace has no route onwards; PostgreSQL is reached through its Unix socket (a path, shared by all namespaces).
``deploy/netns/owner.sh`` (the vpn-netns service) is run by :meth:`Tunnel.start_owner`.
Keys are generated at set-up with ``wg genkey`` and live only in a temporary directory.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

PREFIX = "wlt-"
DEVICE_IP = "10.250.7.10"
DEVICE_SUBNET = "10.250.7.0/24"
VPN_TUNNEL_IP, SITE_TUNNEL_IP = "10.250.0.1", "10.250.0.2"
VPN_UNDERLAY_IP, SITE_UNDERLAY_IP = "192.0.2.1", "192.0.2.2"
VPN_LAN_IP, LAN_GATEWAY_IP = "198.51.100.2", "198.51.100.1"
SITE_PORT = 51820
ENTRYPOINT = Path(__file__).resolve().parents[2] / "deploy" / "wireguard" / "entrypoint.sh"
HEALTHCHECK = ENTRYPOINT.with_name("healthcheck.sh")
OWNER = ENTRYPOINT.parents[1] / "netns" / "owner.sh"
PROBE = Path(__file__).with_name("probe.py")
WG_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
_counter = itertools.count()


def wait_until(predicate: Callable[[], bool], *, what: str, timeout: float = 20.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sh(*cmd: str, check: bool = True, input: str | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        cmd, capture_output=True, text=True, input=input, timeout=30, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def pids_of(*argv: str) -> list[int]:
    """Processes whose command line is exactly ``argv`` (wireguard-go daemonizes: this is how we find it)."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == wanted:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def clean_stale() -> None:
    """Remove namespaces (and their wireguard-go) left by earlier runs whose process is gone."""
    for line in sh("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if name.startswith(PREFIX) and len(parts) >= 3 and parts[1].isdigit() and not _alive(int(parts[1])):
            # what that run started there (servers, wireguard-go, workers) outlived it in sessions of their own
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "delete", name, check=False)
    for sock in Path("/var/run/wireguard").glob("wg[vs]*.sock"):
        pid = sock.stem[3:].split("x")[0]
        if pid.isdigit() and not _alive(int(pid)):
            for stale in pids_of("wireguard-go", sock.stem):
                os.kill(stale, signal.SIGKILL)
            sock.unlink(missing_ok=True)


class Tunnel:
    """The namespaces, links and processes of one test; ``close()`` removes all of them, whatever happened."""

    def __init__(self, workdir: Path) -> None:
        n = next(_counter)
        pid = os.getpid()
        self.tag = f"{PREFIX}{pid}-{n}"
        self.vpn_ns, self.site_ns, self.out_ns = f"{self.tag}-vpn", f"{self.tag}-site", f"{self.tag}-out"
        self.lan_ns = f"{self.tag}-lan"
        suffix = f"{pid}x{n}"  # interface names: at most 15 characters, unique on the machine
        self.vpn_if, self.site_if = f"wgv{suffix}", f"wgs{suffix}"
        self.veth_vpn, self.veth_site = f"vev{suffix}", f"ves{suffix}"
        self.veth_vpn_lan, self.veth_lan = f"vel{suffix}", f"vla{suffix}"
        self.workdir = workdir
        self.processes: list[subprocess.Popen[str]] = []
        self.entrypoint: subprocess.Popen[str] | None = None
        self._namespaces: list[str] = []
        self._files: list[IO[str]] = []

    # -- set-up -----------------------------------------------------------------------------------------------

    def open(self) -> Tunnel:
        for ns in (self.site_ns, self.out_ns, self.lan_ns):
            self._add_namespace(ns)
        # the compose network's view of anything arriving for the device subnet: counted, then dropped
        sh("ip", "netns", "exec", self.lan_ns, "nft", "-f", "-", input=(
            "table ip leak {\n chain pre {\n type filter hook prerouting priority -300; policy accept;\n"
            f" ip daddr {DEVICE_SUBNET} counter drop\n }}\n}}\n"
        ))  # fmt: skip
        self._make_vpn_namespace()
        sh("ip", "-n", self.site_ns, "addr", "add", f"{DEVICE_IP}/32", "dev", "lo")
        self._start_site_peer()
        return self

    def _add_namespace(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _make_vpn_namespace(self) -> None:
        """A fresh vpn namespace, as each start of the vpn-netns container makes: lo, the underlay to the site,
        and eth0 on the compose network with the default route. No fallback routes: that is the owner's job."""
        self._add_namespace(self.vpn_ns)
        for peer_ns, vpn_dev, peer_dev, vpn_ip, peer_ip in (
            (self.site_ns, self.veth_vpn, self.veth_site, VPN_UNDERLAY_IP, SITE_UNDERLAY_IP),
            (self.lan_ns, self.veth_vpn_lan, self.veth_lan, VPN_LAN_IP, LAN_GATEWAY_IP),
        ):
            sh("ip", "link", "add", vpn_dev, "netns", self.vpn_ns, "type", "veth", "peer", "name", peer_dev,
               "netns", peer_ns)  # fmt: skip
            for ns, dev, ip in ((self.vpn_ns, vpn_dev, vpn_ip), (peer_ns, peer_dev, peer_ip)):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.vpn_ns, "route", "add", "default", "via", LAN_GATEWAY_IP)

    def leaked(self) -> int:
        """Packets for the device subnet that reached the compose network (they must never)."""
        out = sh("ip", "netns", "exec", self.lan_ns, "nft", "list", "table", "ip", "leak")
        match = re.search(r"counter packets (\d+)", out)
        assert match, out
        return int(match.group(1))

    def start_owner(self, *, subnets: str | None = None) -> None:
        """What each start of the vpn-netns container does first in its namespace (deploy/netns/owner.sh)."""
        env = {"WG_CONFIG": str(self.client_config()), "WG_INTERFACE": self.vpn_if, "OWNER_ONESHOT": "1",
               "WG_READY_FILE": str(self.workdir / "owner.ready")}  # fmt: skip
        if subnets is not None:
            env["WG_DEVICE_SUBNETS"] = subnets
        sh("ip", "netns", "exec", self.vpn_ns, str(OWNER), env=env)

    def restart_owner(self, *, owner: bool = True) -> None:
        """``docker compose restart vpn-netns``: the namespace and everything in it go (with ``restart: true``
        compose stops wireguard and the workers with it); a new namespace comes, set up by the owner (or, with
        ``owner=False``, bare: the deployment before the owner installed anything)."""
        self.kill_namespace_processes(self.vpn_ns)
        sh("ip", "netns", "delete", self.vpn_ns)
        self._namespaces.remove(self.vpn_ns)
        Path(f"/var/run/wireguard/{self.vpn_if}.sock").unlink(missing_ok=True)
        # the kernel destroys a namespace (and the veth pairs that end in it) after the last reference is gone
        def peers_gone() -> bool:
            return not any(sh("ip", "-n", ns, "link", "show", dev, check=False)
                           for ns, dev in ((self.site_ns, self.veth_site), (self.lan_ns, self.veth_lan)))  # fmt: skip

        wait_until(peers_gone, what="the old namespace's veth pairs gone")
        (self.workdir / "owner.ready").unlink(missing_ok=True)  # the old container's file went with it
        self._make_vpn_namespace()
        if owner:
            self.start_owner()

    def kill_namespace_processes(self, ns: str) -> None:
        for pid in sh("ip", "netns", "pids", ns, check=False).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

        def gone() -> bool:
            for process in self.processes:
                process.poll()  # reaps the killed ones: a zombie would still be listed
            return not sh("ip", "netns", "pids", ns, check=False).split()

        wait_until(gone, what=f"the processes of {ns} gone")

    def _keypair(self, name: str) -> tuple[str, str]:
        private = sh("wg", "genkey").strip()
        public = sh("wg", "pubkey", input=private).strip()
        path = self.workdir / f"{name}.key"
        path.write_text(private)
        path.chmod(0o600)
        return private, public

    def _start_site_peer(self) -> None:
        self.vpn_private, self.vpn_public = self._keypair("vpn")
        _, self.site_public = self._keypair("site")
        self.popen(self.site_ns, "wireguard-go", "-f", self.site_if, env=WG_ENV)
        wait_until(lambda: Path(f"/var/run/wireguard/{self.site_if}.sock").exists(), what="site wireguard-go")
        sh("ip", "netns", "exec", self.site_ns, "wg", "set", self.site_if, "listen-port", str(SITE_PORT),
           "private-key", str(self.workdir / "site.key"), "peer", self.vpn_public, "allowed-ips", f"{VPN_TUNNEL_IP}/32")  # fmt: skip
        sh("ip", "-n", self.site_ns, "addr", "add", f"{SITE_TUNNEL_IP}/32", "dev", self.site_if)
        sh("ip", "-n", self.site_ns, "link", "set", self.site_if, "up")
        sh("ip", "-n", self.site_ns, "route", "add", f"{VPN_TUNNEL_IP}/32", "dev", self.site_if)

    def client_config(self) -> Path:
        """The vpn side's config, shaped like deploy/wireguard/wg0.conf.example."""
        path = self.workdir / f"{self.vpn_if}.conf"
        path.write_text(
            "[Interface]\n"
            f"PrivateKey = {self.vpn_private}\n"
            f"Address = {VPN_TUNNEL_IP}/32\n\n"
            "[Peer]\n"
            f"PublicKey = {self.site_public}\n"
            f"Endpoint = {SITE_UNDERLAY_IP}:{SITE_PORT}\n"
            f"AllowedIPs = {SITE_TUNNEL_IP}/32, {DEVICE_SUBNET}\n"
            "PersistentKeepalive = 25\n"
        )
        path.chmod(0o600)
        return path

    # -- the wireguard service --------------------------------------------------------------------------------

    def start_wireguard(self) -> subprocess.Popen[str]:
        """Runs the wireguard service's entrypoint in the vpn namespace, as the container would."""
        env = {**WG_ENV, "WG_CONFIG": str(self.client_config()), "WG_INTERFACE": self.vpn_if,
               "WG_RUN_DIR": str(self.workdir / "run")}  # fmt: skip
        self.entrypoint = self.popen(self.vpn_ns, str(ENTRYPOINT), env=env)
        wait_until(self.interface_up, what=f"{self.vpn_if} up")
        return self.entrypoint

    def interface_up(self) -> bool:
        out = sh("ip", "-n", self.vpn_ns, "-o", "link", "show", self.vpn_if, check=False)
        return ",UP" in out or "<UP" in out

    def healthy(self, max_age: int = 180) -> bool:
        """The wireguard service's healthcheck, run in its namespace."""
        env = {**os.environ, "WG_INTERFACE": self.vpn_if, "WG_HANDSHAKE_MAX_AGE": str(max_age)}
        result = subprocess.run(
            ["ip", "netns", "exec", self.vpn_ns, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30
        )
        return result.returncode == 0

    def kill_vpn_wireguard_go(self) -> None:
        """What a crash of the wireguard container does to the tunnel: its wireguard-go dies, wg0 with it."""
        pids = pids_of("wireguard-go", self.vpn_if)
        assert pids, f"no wireguard-go for {self.vpn_if}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    def set_site_link(self, up: bool) -> None:
        """The site stops (or resumes) answering: its end of the underlay goes down."""
        sh("ip", "-n", self.site_ns, "link", "set", self.veth_site, "up" if up else "down")

    # -- processes --------------------------------------------------------------------------------------------

    def popen(
        self, ns: str, *cmd: str, env: dict[str, str] | None = None, log: Path | None = None, **kwargs: Any
    ) -> subprocess.Popen[str]:
        """Starts ``cmd`` in namespace ``ns``; its output goes to a pipe, or appended to the file ``log``."""
        if log is not None:
            kwargs["stdout"] = log.open("a")
            self._files.append(kwargs["stdout"])
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd], env={**os.environ, **(env or {})}, text=True,
            start_new_session=True, **kwargs,
        )  # fmt: skip
        self.processes.append(process)
        return process

    def serve_http(self, port: int = 8080) -> subprocess.Popen[str]:
        """A plain HTTP server on the device address, in the site namespace."""
        server = self.popen(self.site_ns, sys.executable, "-u", "-m", "http.server", "--bind", DEVICE_IP, str(port),
                            "--directory", str(self.workdir))  # fmt: skip
        assert server.stdout is not None
        first = read_line(server.stdout, timeout=15)
        assert first.startswith("Serving HTTP"), first
        return server

    def probe(self, ns: str, url: str, timeout: float = 3.0, post: str | None = None) -> dict[str, Any]:
        extra = [post] if post is not None else []
        out = sh("ip", "netns", "exec", ns, sys.executable, str(PROBE), url, str(timeout), *extra)
        result: dict[str, Any] = json.loads(out)
        return result

    # -- tear-down --------------------------------------------------------------------------------------------

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()
        for name in (self.vpn_if, self.site_if):
            for pid in pids_of("wireguard-go", name) + pids_of("wireguard-go", "-f", name):
                os.kill(pid, signal.SIGKILL)
        for ns in self._namespaces:
            sh("ip", "netns", "delete", ns, check=False)
        for file in self._files:
            file.close()
        for name in (self.vpn_if, self.site_if):
            Path(f"/var/run/wireguard/{name}.sock").unlink(missing_ok=True)


def read_line(stream: IO[str], *, timeout: float) -> str:
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError("no output from the process")
    return stream.readline()
