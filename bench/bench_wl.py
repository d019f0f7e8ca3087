"""wl-workers against simulated routers: actions per second on one router that takes 50 ms per request with
``max_concurrent`` 2 (two workers), and one reconcile pass over 10 routers x 1,000 services, one of them hung."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import psycopg

import pg_worker
from pg_worker import AsyncProducer, Worker, WorkerConfig
from wl_workers._migrate import migrate
from wl_workers._store import add_device
from wl_workers.actions import DEACTIVATE, action_message
from wl_workers.app import build_app
from wl_workers.reconcile import reconcile
from wl_workers.settings import DEVICE_ACTIONS, QUEUES, WlSettings
from wl_workers.simulator import RouterSimulator

from .common import Row, Server

PASSWORD_ENV = "WL_BENCH_ROUTER_PASSWORD"
REQUEST_TIME = 0.05
REQUESTS_PER_ACTION = 3  # look-up, change, verify


async def _prepare(url: str) -> None:
    await migrate(url)
    await pg_worker.install(url, QUEUES)


async def _router(url: str, sim: RouterSimulator, name: str, max_concurrent: int = 2) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await add_device(conn, name=name, host="127.0.0.1", port=sim.port, scheme="http", username=sim.username, password_ref=f"env:{PASSWORD_ENV}", max_concurrent=max_concurrent)
        cur = await conn.execute("SELECT id FROM wl.devices WHERE name = %s", (name,))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def _services(url: str, device_id: int, prefix: str, n: int, third_octet: int) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO wl.customer_services (service_id, device_id, method, target) "
            "SELECT %(p)s || i, %(d)s, 'address-list', '10.' || %(o)s || '.' || (i / 250) || '.' || (i %% 250 + 1) FROM generate_series(0, %(n)s - 1) i",
            {"p": prefix, "d": device_id, "o": third_octet, "n": n},
        )


class SimProcess:
    """The simulator in a process of its own (``wl-workers simulate-router``): its threads must not take the GIL
    from the workers being measured, or every request looks slower than the router's own 50 ms."""

    username = "api"

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        env = {**os.environ, "WL_LOG_LEVEL": "WARNING", "PG_WORKER_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wl_workers", "simulate-router", "--port", str(self.port), "--username", self.username, "--password-env", PASSWORD_ENV],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError("the simulator did not start")

    def control(self, command: dict[str, Any]) -> dict[str, Any]:
        with httpx.Client() as client:
            result: dict[str, Any] = client.post(f"http://127.0.0.1:{self.port}/__sim__/control", json=command).json()
            return result

    def listed(self) -> int:
        return sum(1 for item in self.control({"action": "state"})["menus"]["ip/firewall/address-list"] if item.get("list") == "morosos")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _actions_per_second(url: str, n: int) -> float:
    settings = WlSettings(busy_retry_delay=0.2, http_read_timeout=5.0)
    sim = SimProcess()
    try:
        device_id = await _router(url, sim, "r1")  # type: ignore[arg-type]
        await _services(url, device_id, "a", n, 30)
        sim.control({"action": "slow", "seconds": REQUEST_TIME})
        async with AsyncProducer(url) as producer:
            for i in range(n):
                await producer.enqueue(DEVICE_ACTIONS, action_message(DEACTIVATE, f"a{i}", _now(), "bench"))
        workers = [Worker(build_app(url, settings), url, WorkerConfig(worker_id=f"bench-{i}", concurrency=16)) for i in range(2)]
        started = time.monotonic()
        tasks = [asyncio.create_task(w.run()) for w in workers]
        try:
            await _until(lambda: sim.listed() >= n)
            took = time.monotonic() - started
        finally:
            for w in workers:
                w.request_stop()
            await asyncio.gather(*tasks)
        return n / took
    finally:
        sim.stop()


async def _reconcile_pass(url: str, routers: int, per_router: int, hung: bool) -> float:
    settings = WlSettings(reconcile_device_budget=10.0, http_read_timeout=30.0)
    sims = [RouterSimulator(username="api", password=os.environ[PASSWORD_ENV]).start() for _ in range(routers)]
    try:
        for index, sim in enumerate(sims):
            device_id = await _router(url, sim, f"r{index}")
            await _services(url, device_id, f"s{index}-", per_router, index)
            for i in range(0, per_router, 2):  # half of them suspended by hand: every other one differs
                sim.add("ip/firewall/address-list", list="morosos", address=f"10.{index}.{i // 250}.{i % 250 + 1}", comment="wl-workers: suspended")
        if hung:
            sims[-1].faults.delay = 60.0
        started = time.monotonic()
        report = await reconcile(url, settings, dry_run=True)
        took = time.monotonic() - started
        expected_failed = 1 if hung else 0
        assert len(report.failed_devices) == expected_failed, report.failed_devices
        assert len(report.differences) == (routers - expected_failed) * per_router // 2
        return took
    finally:
        for sim in sims:
            sim.faults.delay = 0.0
            sim.stop()


async def _until(predicate: Any) -> None:
    for _ in range(20_000):  # polls the router's state: 0.2 s apart, an hour at most
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the actions were not all applied")


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def run(server: Server, *, quick: bool, repeat: int) -> list[Row]:
    os.environ.setdefault(PASSWORD_ENV, "bench-router-pw")
    n = 40 if quick else 200
    per_router = 100 if quick else 1000
    ideal = 2 / (REQUEST_TIME * REQUESTS_PER_ACTION)
    actions = Row(
        "wl", f"suspensions/s, one router 50 ms/request, max_concurrent 2, 2 workers ({n} actions)", "actions/s",
        baseline_name="router-bound ideal (2 slots / 3 requests)", target=">= 0.8x ideal",
    )  # fmt: skip
    passes = Row(
        "wl", f"reconcile pass, 10 routers x {per_router} services, one hung (budget 10 s)", "s",
        baseline_name="same pass, no hung router", target="<= budget + 2 s", higher_is_better=False,
    )  # fmt: skip
    for _ in range(1 if quick else repeat):
        with server.database([], install=False) as url:
            asyncio.run(_prepare(url))
            actions.ours.append(asyncio.run(_actions_per_second(url, n)))
            actions.baseline.append(ideal)
        for hung, target in ((True, passes.ours), (False, passes.baseline)):
            with server.database([], install=False) as url:
                asyncio.run(_prepare(url))
                target.append(asyncio.run(_reconcile_pass(url, 10, per_router, hung)))
    return [actions, passes]
