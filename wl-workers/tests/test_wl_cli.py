"""Migrations (concurrent, forward-only) and the operator CLI, run in-process through ``main``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import psycopg
import pytest

from wl_fixtures import Cli
from wl_helpers import drain, fast_settings, wait_until
from wl_workers._migrate import Migration, MigrationError, load_migrations, migrate
from wl_workers.reconcile import reconcile
from wl_workers.simulator import RouterSimulator


async def test_concurrent_migrations_apply_once(wl_empty_db: str) -> None:
    reports = await asyncio.gather(migrate(wl_empty_db), migrate(wl_empty_db), migrate(wl_empty_db))
    assert sorted(len(r.applied) for r in reports) == [0, 0, len(load_migrations())]
    async with await psycopg.AsyncConnection.connect(wl_empty_db) as conn:
        cur = await conn.execute("SELECT count(*) FROM wl.schema_migrations")
        assert (await cur.fetchone()) == (len(load_migrations()),)


async def test_changed_or_unknown_migration_is_refused(wl_empty_db: str) -> None:
    await migrate(wl_empty_db)
    first, *rest = load_migrations()
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(wl_empty_db, [Migration(first.version, first.name, first.sql + "\n-- edited"), *rest])
    with pytest.raises(MigrationError, match="does not know"):
        await migrate(wl_empty_db, [])


def test_migrate_command_creates_schema_and_queues(wl_empty_db: str, cli: Cli) -> None:
    code, out, _ = cli(wl_empty_db, "migrate")
    assert code == 0 and "device_actions" in out and "payment_sync" in out
    code, out, _ = cli(wl_empty_db, "migrate")
    assert code == 0 and "applied: none" in out and "queues created: none" in out


def test_operator_flow(wl_db: str, sim: RouterSimulator, cli: Cli) -> None:
    run = cli
    ref = "env:WL_TEST_ROUTER_PASSWORD"
    assert run(wl_db, "device", "add", "r1", "--host", "127.0.0.1", "--port", str(sim.port), "--scheme", "http", "--username", "api", "--password-ref", ref)[0] == 0
    code, _, err = run(wl_db, "device", "add", "r2", "--host", "h", "--username", "u", "--password-ref", "hunter2")
    assert code == 2 and "env:NAME or file:/absolute/path" in err
    code, out, _ = run(wl_db, "device", "list")
    assert "r1" in out and ref in out and sim.password not in out
    assert '"max_concurrent": 2' in run(wl_db, "device", "show", "r1")[1]
    code, _, err = run(wl_db, "service", "add", "c1", "--device", "r1", "--method", "address-list", "--target", "not-an-ip")
    assert code == 2 and "IP address" in err
    assert run(wl_db, "service", "add", "c1", "--device", "r1", "--method", "address-list", "--target", "10.9.0.1")[0] == 0
    code, _, err = run(wl_db, "service", "add", "c2", "--device", "nope", "--method", "pppoe", "--target", "u")
    assert code == 2 and "no device named 'nope'" in err
    assert "10.9.0.1" in run(wl_db, "service", "list")[1]
    code, out, _ = run(wl_db, "deactivate", "c1", "--reason", "test")
    assert code == 0 and "enqueued service.deactivate" in out
    assert run(wl_db, "activate", "nope")[0] == 2
    asyncio.run(drain(wl_db))
    code, out, _ = run(wl_db, "service", "show", "c1")
    assert "desired   suspended" in out and "applied   suspended" in out and "device    suspended" in out
    sim.remove_where("ip/firewall/address-list", address="10.9.0.1")  # by hand
    code, out, _ = run(wl_db, "reconcile", "--dry-run")
    assert code == 0 and "would enqueue service.deactivate" in out
    code, _, err = run(wl_db, "device", "remove", "r1")
    assert code == 2 and "still has 1 service" in err


def test_demo_seed_matches_the_seeded_simulator(wl_db: str, cli: Cli, router_password: str) -> None:
    with RouterSimulator(username="api", password=router_password) as sim:
        sim.seed_demo()
        code, out, _ = cli(wl_db, "demo-seed", "--url", sim.url, "--username", "api", "--password-ref", "env:WL_TEST_ROUTER_PASSWORD")
        assert code == 0 and "cust-1001" in out
        assert cli(wl_db, "demo-seed", "--url", sim.url)[0] == 0, "idempotent"
        assert cli(wl_db, "demo-seed", "--url", "http://127.0.0.1:1")[0] == 0
        code, out, _ = cli(wl_db, "device", "show", "demo-router")
        assert code == 0 and '"port": 1,' in out, "an existing demo router follows --url (the simulator moved)"
        assert cli(wl_db, "demo-seed", "--url", sim.url)[0] == 0
        report = asyncio.run(reconcile(wl_db, fast_settings(), dry_run=True))
        assert report.checked == 5 and report.differences == [] and report.errors == []


async def test_simulate_router_command(router_password: str) -> None:
    from test_wl_processes import free_port

    port = free_port()
    env = {**os.environ, "WL_SIM_PASSWORD": router_password}
    proc = subprocess.Popen(  # noqa: ASYNC220 - starting it is instant; the waits below are async
        [sys.executable, "-m", "wl_workers", "simulate-router", "--port", str(port), "--seed-demo"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", auth=("admin", router_password)) as client:

            async def answers() -> bool:
                try:
                    return (await client.get("/rest/ppp/secret")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(answers, what="simulator listening")
            secrets = (await client.get("/rest/ppp/secret")).json()
            assert sorted(s["name"] for s in secrets) == ["pppoe-2001", "pppoe-2002"]
            state = (await client.post("/__sim__/control", json={"action": "reboot"})).json()
            assert state["reboots"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.to_thread(proc.wait, 10)
    assert code == 0 and time.monotonic() - started < 10


def test_run_refuses_an_unmigrated_database(wl_empty_db: str, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_WORKER_METRICS", "false")
    code, _, err = cli(wl_empty_db, "run")
    assert code == 1 and "run `wl-workers migrate` first" in err and "0001_devices_and_services.sql" in err
