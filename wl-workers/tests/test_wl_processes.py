"""Two `wl-workers run` processes against one router: the per-device limit and the per-service serialization
hold across processes; the worker's /metrics shows the per-device metrics; SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from wl_helpers import add_customer, add_router, at, enqueue, queue_depth, service_row, wait_until
from wl_workers.actions import ACTIVATE, DEACTIVATE
from wl_workers.simulator import RouterSimulator

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Workers:
    def __init__(self, url: str, count: int, tmp: str, **extra_env: str) -> None:
        self.url = url
        self.metrics_ports = [free_port() for _ in range(count)]
        self.logs = [os.path.join(tmp, f"worker-{i}.log") for i in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(count):
            env = {
                **os.environ,
                "DATABASE_URL": url,
                "PG_WORKER_CONCURRENCY": "6",
                "PG_WORKER_METRICS_PORT": str(self.metrics_ports[i]),
                "PG_WORKER_LOG_FORMAT": "json",
                "PG_WORKER_WORKER_ID": f"proc-{i}",
                "WL_ACTION_BASE_DELAY": "0.1",
                "WL_ACTION_MAX_DELAY": "0.5",
                "WL_BUSY_RETRY_DELAY": "0.1",
                "WL_ACTION_MAX_ATTEMPTS": "50",
                **extra_env,
            }
            with open(self.logs[i], "wb") as log:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "wl_workers", "run"], env=env, stdout=log, stderr=subprocess.STDOUT))

    def log(self, i: int) -> str:
        with open(self.logs[i], encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> list[int]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=30))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes


@pytest.fixture
def workers(wl_db: str, tmp_path: object) -> Iterator[Workers]:
    w = Workers(wl_db, 2, str(tmp_path))
    yield w
    w.stop()


async def marked_waiting(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(DISTINCT worker_id) FROM pgworker.waiters")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def test_device_limit_and_service_serialization_across_two_processes(wl_db: str, sim: RouterSimulator, workers: Workers) -> None:
    await add_router(wl_db, sim, max_concurrent=2)
    services = [f"c{i}" for i in range(6)]
    for i, service in enumerate(services):
        await add_customer(wl_db, service, "address-list", f"10.20.1.{i + 1}")
    await wait_until(lambda: _two(wl_db, workers), what="both workers started and waiting")
    sim.faults.delay = 0.15  # every request takes a while, so actions overlap if nothing stops them
    sim.reset_counters()
    for service in services:
        await enqueue(wl_db, DEACTIVATE, service, at(0))
    # four actions on one service at once, out of order: the newest (activate at 9) must win
    for minutes, action in ((3, DEACTIVATE), (9, ACTIVATE), (1, DEACTIVATE), (6, DEACTIVATE)):
        await enqueue(wl_db, action, "c0", at(minutes))

    async def done() -> bool:
        if await queue_depth(wl_db, "device_actions"):
            return False
        rows = [await service_row(wl_db, s) for s in services]
        return all(r.applied_state is not None for r in rows)

    await wait_until(done, limit=60, interval=0.1, what="all actions done")
    assert sim.max_in_flight <= 2, f"{sim.max_in_flight} requests at once on a device limited to 2"
    assert sim.max_in_flight == 2, "both slots were used (the limit, not a serialization, is what held)"
    assert sim.max_in_flight_per_key == 1, "two actions on one service overlapped"
    assert not sim.is_suspended_address("10.20.1.1"), "the newest event (activate) wins"
    assert (await service_row(wl_db, "c0")).applied_event_at == at(9)
    assert all(sim.is_suspended_address(f"10.20.1.{i + 1}") for i in range(1, 6))
    applied_by = [workers.log(i).count('"action_applied"') for i in range(2)]
    assert all(n > 0 for n in applied_by), f"both processes did work: {applied_by}"
    applied_lines = [json.loads(line) for line in workers.log(0).splitlines() if '"action_applied"' in line]
    assert applied_lines and all(line["device"] == "r1" and line["service_id"] in services for line in applied_lines)

    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{workers.metrics_ports[0]}/metrics")).text
    assert 'wl_device_actions_total{action="service.deactivate",device="r1",outcome="applied"}' in text
    assert "wl_device_action_duration_seconds_bucket" in text and "pg_worker_jobs_total" in text
    assert workers.stop() == [0, 0]
    assert sim.password not in workers.log(0) + workers.log(1)


async def _two(url: str, workers: Workers) -> bool:
    exited = [p.returncode for p in workers.procs if p.poll() is not None]
    assert not exited, f"a worker exited early ({exited}): {workers.log(0)[-2000:]} {workers.log(1)[-2000:]}"
    return await marked_waiting(url) >= 2


async def test_run_reconciles_periodically(wl_db: str, sim: RouterSimulator, tmp_path: object) -> None:
    """`wl-workers run` repairs a router changed behind its back by itself (the reconcile background task)."""
    await add_router(wl_db, sim)
    await add_customer(wl_db, "c-rec", "address-list", "10.20.2.1")
    sim.add("ip/firewall/address-list", list="morosos", address="10.20.2.1", comment="wl-workers: suspended")  # a stale backup restored
    worker = Workers(wl_db, 1, str(tmp_path), WL_RECONCILE_INTERVAL="0.5")
    try:
        await wait_until(lambda: not sim.is_suspended_address("10.20.2.1"), limit=30, what="the router repaired by the periodic reconcile")
        assert '"reconcile_finished"' in worker.log(0)
        assert worker.stop() == [0]
    finally:
        worker.stop()
