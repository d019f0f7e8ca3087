"""The device-network self-check (issue 11): real sockets on 127.0.0.1 and the real ``lo`` interface; the
``wl-workers run`` process reports it in /readyz and exits non-zero once it has failed for EXIT_AFTER."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from wl_helpers import wait_until
from wl_workers.metrics import NETCHECKS
from wl_workers.netcheck import (
    DeviceNetworkDown,
    DeviceNetworkLost,
    NetcheckConfig,
    NetworkMonitor,
    Target,
    check,
    interface_problem,
    parse_targets,
)
from wl_workers.settings import WlSettings


def closed_port() -> int:
    """A port nothing listens on (bound, then released: connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Listener:
    """A TCP server on 127.0.0.1 that accepts and closes, and can be stopped (the device goes away)."""

    def __init__(self, server: asyncio.Server) -> None:
        self.server = server
        self.port = int(server.sockets[0].getsockname()[1])
        self.target = Target("127.0.0.1", self.port)

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    handle = Listener(server)
    yield handle
    await handle.stop()


def failures(kind: str) -> float:
    return NETCHECKS.labels(result=kind)._value.get()


# -- the check -------------------------------------------------------------------------------------------------


async def test_a_listening_device_port_passes_and_a_closed_one_fails_with_its_reason(listener: Listener) -> None:
    await check(NetcheckConfig(targets=(listener.target,)))
    closed = Target("127.0.0.1", closed_port())
    with pytest.raises(DeviceNetworkDown) as caught:
        await check(NetcheckConfig(targets=(closed,), connect_timeout=2))
    assert caught.value.kind == "targets"
    assert str(caught.value).startswith("no device address answered: ")
    assert f"127.0.0.1:{closed.port} Connection refused" in str(caught.value)
    # one device answering is enough
    await check(NetcheckConfig(targets=(closed, listener.target)))


async def test_the_interface_must_exist_and_be_up() -> None:
    assert interface_problem("lo") is None
    assert interface_problem("wlnc-missing0") == "interface wlnc-missing0 does not exist"
    await check(NetcheckConfig(interface="lo"))
    with pytest.raises(DeviceNetworkDown, match="interface wlnc-missing0 does not exist") as caught:
        await check(NetcheckConfig(interface="wlnc-missing0"))
    assert caught.value.kind == "interface"


def test_targets_and_settings_are_validated() -> None:
    assert parse_targets(" 10.20.0.1:443, ,router-1.isp:8728,[fd00::1]:443") == (
        Target("10.20.0.1", 443),
        Target("router-1.isp", 8728),
        Target("fd00::1", 443),
    )
    assert str(Target("fd00::1", 443)) == "[fd00::1]:443"
    for bad in ("10.20.0.1", "10.20.0.1:0", "10.20.0.1:https", ":443", "fd00::1:443", "[nope]:443"):
        with pytest.raises(ValueError, match="device-network target"):
            parse_targets(bad)
    with pytest.raises(ValidationError, match="device-network target"):
        WlSettings(netcheck_targets="10.20.0.1")
    with pytest.raises(ValidationError, match="not a valid interface name"):
        WlSettings(netcheck_interface="wg0/x")
    with pytest.raises(ValueError, match="needs an interface, targets, or both"):
        NetcheckConfig()
    assert WlSettings(netcheck_interface=" ").netcheck() is None, "blank means off (local development)"
    config = WlSettings(netcheck_interface="wg0", netcheck_targets="10.20.0.1:443", netcheck_exit_after=5).netcheck()
    assert config == NetcheckConfig(interface="wg0", targets=(Target("10.20.0.1", 443),), interval=10.0, exit_after=5.0)


# -- the monitor -----------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_monitor_reports_the_loss_only_after_exit_after_without_a_pause(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wl_workers.netcheck")
    clock = Clock()
    monitor = NetworkMonitor(NetcheckConfig(targets=(listener.target,), exit_after=60), clock=clock)
    before = failures("targets")
    assert await monitor.check_once() is None and monitor.failing_since is None
    await listener.stop()

    assert await monitor.check_once() is None  # down: logged, counted, not yet lost
    assert monitor.failing_since == 1000.0 and "Connection refused" in (monitor.reason or "")
    clock.now += 30
    with pytest.raises(DeviceNetworkDown, match=r"Connection refused.*\(failing for 30s\)"):
        await monitor.readiness()
    clock.now += 29.9
    assert await monitor.check_once() is None
    clock.now += 0.1
    lost = await monitor.check_once()
    assert isinstance(lost, DeviceNetworkLost) and "device network lost for 60s" in str(lost)
    assert failures("targets") - before == 3

    events = [r for r in caplog.records if getattr(r, "event", "").startswith("device_network")]
    assert [r.__dict__["event"] for r in events] == ["device_network_down", "device_network_lost"]
    assert events[-1].levelno == logging.ERROR
    assert events[-1].__dict__["targets"] == [str(listener.target)] and events[-1].__dict__["down_for"] == 60.0


async def test_a_recovery_resets_the_clock_and_exit_after_zero_never_exits(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wl_workers.netcheck")
    clock = Clock()
    port = closed_port()
    monitor = NetworkMonitor(NetcheckConfig(targets=(Target("127.0.0.1", port),), exit_after=10), clock=clock)
    assert await monitor.check_once() is None
    clock.now += 9
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    try:
        assert await monitor.check_once() is None and monitor.failing_since is None
        assert await monitor.readiness() is True
    finally:
        server.close()
        await server.wait_closed()
    assert [r.__dict__["event"] for r in caplog.records][-1] == "device_network_restored"
    clock.now += 1
    assert await monitor.check_once() is None  # down again: the 10 s start over
    clock.now += 9.5
    assert await monitor.check_once() is None
    clock.now += 0.5
    assert isinstance(await monitor.check_once(), DeviceNetworkLost)

    never = NetworkMonitor(NetcheckConfig(interface="wlnc-missing0", exit_after=0), clock=clock)
    for _ in range(3):
        assert await never.check_once() is None
        clock.now += 3600


async def test_run_stops_on_the_event(listener: Listener) -> None:
    monitor = NetworkMonitor(NetcheckConfig(targets=(listener.target,), interval=30))
    stop = asyncio.Event()
    before = failures("ok")
    task = asyncio.create_task(monitor.run(stop))
    await wait_until(lambda: failures("ok") > before, what="a first check")
    stop.set()
    assert await asyncio.wait_for(task, timeout=5) is None


# -- the worker process ----------------------------------------------------------------------------------------


@pytest.fixture
def worker_env(wl_db: str) -> dict[str, str]:
    metrics_port = closed_port()
    return {
        **os.environ,
        "DATABASE_URL": wl_db,
        "PG_WORKER_METRICS_PORT": str(metrics_port),
        "PG_WORKER_LOG_FORMAT": "json",
        "WL_NETCHECK_INTERVAL": "0.2",
        "WL_NETCHECK_TIMEOUT": "1",
    }


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "wl_workers", "run"], env=env, stdout=log, stderr=subprocess.STDOUT)


def readyz(port: str) -> tuple[int, dict[str, Any]]:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    except httpx.TransportError:
        return 0, {}
    return response.status_code, response.json()


def device_network(body: dict[str, Any]) -> dict[str, Any]:
    checks = {c["name"]: c for c in body.get("checks", [])}
    return dict(checks.get("device_network", {}))


@pytest.mark.slow
async def test_the_worker_reports_the_lost_network_then_exits_non_zero(
    listener: Listener, worker_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**worker_env, "WL_NETCHECK_TARGETS": f"127.0.0.1:{listener.port}", "WL_NETCHECK_EXIT_AFTER": "2"}
    port = env["PG_WORKER_METRICS_PORT"]
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, log_path)
    try:
        await wait_until(lambda: readyz(port)[0] == 200, what="a ready worker")
        assert device_network(readyz(port)[1]) == {"name": "device_network", "ok": True, "detail": "ok"}
        await listener.stop()  # the device network goes away

        seen: list[dict[str, Any]] = []

        def not_ready() -> bool:
            status, body = readyz(port)
            if status == 503:
                seen.append(device_network(body))
            return bool(seen)

        await wait_until(not_ready, interval=0.05, what="/readyz 503")
        assert seen[0]["ok"] is False
        assert seen[0]["detail"].startswith(f"DeviceNetworkDown: no device address answered: 127.0.0.1:{listener.port}")
        # the periodic check counts its failures (readiness probes do not)
        await wait_until(
            lambda: 'wl_device_network_checks_total{result="targets"}' in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text,
            what="the failure counted",
        )  # fmt: skip

        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    output = log_path.read_text()
    assert code == 1, output
    lost = [json.loads(line) for line in output.splitlines() if '"device_network_lost"' in line]
    assert len(lost) == 1 and lost[0]["targets"] == [f"127.0.0.1:{listener.port}"] and lost[0]["down_for"] >= 2, output
    assert "wl-workers: device network lost for" in output and "restart policy" in output
    assert output.index("\"device_network_lost\"") < output.index("\"worker_stopped\""), "a graceful stop, then the exit"


@pytest.mark.slow
async def test_without_the_variables_the_check_is_off(worker_env: dict[str, str], tmp_path: Path) -> None:
    port = worker_env["PG_WORKER_METRICS_PORT"]
    proc = start_worker(worker_env, tmp_path / "worker.log")
    try:
        await wait_until(lambda: readyz(port)[0] == 200, what="a ready worker")
        assert device_network(readyz(port)[1]) == {}
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0


class BrokenMonitor(NetworkMonitor):
    """A check with a bug (no real network state makes the real one raise anything but DeviceNetworkDown)."""

    async def check_once(self) -> DeviceNetworkLost | None:
        raise RuntimeError("bug in the check")


async def test_a_broken_check_stops_the_worker_loudly(caplog: pytest.LogCaptureFixture) -> None:
    from pg_worker import Worker, WorkerCrashed
    from wl_workers.app import build_app
    from wl_workers.runner import _watch_device_network

    worker = Worker(build_app("postgresql:///unused"), "postgresql:///unused")  # never run: only asked to stop
    outcome = await _watch_device_network(BrokenMonitor(NetcheckConfig(interface="lo")), worker, asyncio.Event())
    assert isinstance(outcome, WorkerCrashed) and "RuntimeError: bug in the check" in str(outcome)
    assert worker.health.stopping
    assert any(r.__dict__.get("event") == "device_network_check_crashed" for r in caplog.records)
