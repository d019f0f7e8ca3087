"""The local system as an operator runs it, every part its own process: ``wl-workers migrate`` and ``demo-seed``,
``wl-workers run``, ``payment-webhook migrate`` and ``serve``, then ``payment-webhook send-test-event`` for the
suspended demo customer, and the simulated router shows that customer restored.

The router is wl-workers' RouterOS simulator (in this process, on 127.0.0.1): it is what we look at.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from webhook_helpers import STANDARD_SECRETS, serve_process
from wl_workers.simulator import RouterSimulator

SIM_PASSWORD = "local-system-sim-password"
SUSPENDED_CUSTOMER = ("cust-1003", "10.20.0.13")  # in wl_workers.simulator.DEMO_CUSTOMERS


def _run(env: dict[str, str], *command: str) -> str:
    result = subprocess.run([sys.executable, "-m", *command], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr[-2000:]}"
    return result.stdout


@pytest.fixture
def demo_router() -> Iterator[RouterSimulator]:
    with RouterSimulator(username="admin", password=SIM_PASSWORD) as sim:
        sim.seed_demo()
        yield sim


@contextmanager
def worker_process(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "wl_workers", "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()  # SIGTERM: a graceful stop
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.slow
def test_send_test_event_restores_the_suspended_demo_customer(blank_db: str, demo_router: RouterSimulator) -> None:
    service_id, address = SUSPENDED_CUSTOMER
    assert demo_router.is_suspended_address(address)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "PG_WORKER_", "WL_"))},
        "DATABASE_URL": blank_db,
        "WL_SIM_PASSWORD": SIM_PASSWORD,
        "PG_WORKER_METRICS": "false",  # no fixed port on a shared machine
        "WEBHOOK_STANDARD_SECRETS": STANDARD_SECRETS[0],
    }
    _run(env, "wl_workers", "migrate")
    _run(env, "payment_webhook", "migrate")
    _run(env, "wl_workers", "demo-seed", "--url", demo_router.url)
    with serve_process(blank_db) as (base_url, _server), worker_process(env) as worker:
        sent = _run(env, "payment_webhook", "send-test-event", "--url", base_url, "--service-id", service_id)
        assert sent.startswith("200 ") and '"accepted"' in sent
        deadline = time.monotonic() + 30
        while demo_router.is_suspended_address(address):
            assert worker.poll() is None, "wl-workers run exited"
            assert time.monotonic() < deadline, "the customer was not restored within 30 s"
            time.sleep(0.05)
    assert not demo_router.is_suspended_address(address)
