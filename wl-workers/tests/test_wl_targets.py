"""Every kind of target (IPv4/IPv6 addresses and prefixes, PPPoE), only our own entries touched, and every device
answer classified (HTML bodies, refused reads, binary-API control bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from wl_helpers import add_customer, add_router, at, dlq, drain, enqueue, fast_settings, service_row
from wl_workers._store import Device, validate_target
from wl_workers.actions import ACTIVATE, DEACTIVATE
from wl_workers.drivers import ForeignEntryError, PermanentDeviceError, Timeouts, TransientDeviceError, make_driver
from wl_workers.history import list_history
from wl_workers.simulator import RouterSimulator

AL4, AL6 = "ip/firewall/address-list", "ipv6/firewall/address-list"


def device_for(sim: RouterSimulator, kind: str = "rest", **overrides: Any) -> Device:
    base = Device(
        id=1, name="r1", driver="routeros-rest", host="127.0.0.1", port=sim.port, scheme="http", ca_file=None, tls_insecure=False,
        username=sim.username, password_ref="env:X", max_concurrent=2, address_list="morosos",
    )  # fmt: skip
    if kind == "api":
        base = dataclasses.replace(base, driver="routeros-api", port=sim.api_port)
    return dataclasses.replace(base, **overrides)


def test_targets_are_validated_and_canonical() -> None:
    assert validate_target("address-list", " 10.20.0.11 ") == "10.20.0.11"
    assert validate_target("address-list", "10.20.5.0/29") == "10.20.5.0/29"
    assert validate_target("address-list", "10.20.0.11/32") == "10.20.0.11"
    assert validate_target("address-list", "2001:DB8::1") == "2001:db8::1"
    assert validate_target("address-list", "2001:db8::1/128") == "2001:db8::1"
    assert validate_target("address-list", "2001:db8:5::/56") == "2001:db8:5::/56"
    with pytest.raises(ValueError, match=r"host bits set: the prefix is 10\.20\.5\.0/29"):
        validate_target("address-list", "10.20.5.3/29")
    with pytest.raises(ValueError, match="IP address or prefix, IPv4 or IPv6"):
        validate_target("address-list", "cust-1")
    assert validate_target("pppoe", "pppoe-1") == "pppoe-1"


@pytest.mark.parametrize("kind", ["rest", "api"])
@pytest.mark.parametrize(("target", "menu"), [("10.20.5.0/29", AL4), ("2001:db8::1", AL6), ("2001:db8:5::/56", AL6)])
async def test_subnets_and_ipv6_go_to_the_right_list(sim: RouterSimulator, kind: str, target: str, menu: str) -> None:
    driver = make_driver(device_for(sim, kind), sim.password, Timeouts(1.0, 1.0))
    try:
        await driver.ensure_suspended("address-list", target)
        entries = sim.items(menu, list="morosos")
        assert len(entries) == 1 and entries[0]["comment"].startswith("wl-workers")
        other = AL4 if menu == AL6 else AL6
        assert sim.items(other) == []
        assert (await driver.read_state("address-list", target)).state == "suspended"
        await driver.ensure_suspended("address-list", target)  # idempotent: the router's /128 form matches too
        assert len(sim.items(menu, list="morosos")) == 1
        await driver.ensure_active("address-list", target)
        assert sim.items(menu) == []
    finally:
        await driver.aclose()


async def test_restore_removes_only_our_entries(sim: RouterSimulator) -> None:
    sim.add(AL4, list="morosos", address="10.20.0.11", comment="NOC: abuse block")
    driver = make_driver(device_for(sim), sim.password, Timeouts(1.0, 1.0))
    try:
        state = await driver.read_state("address-list", "10.20.0.11")
        assert state.state == "suspended" and state.foreign and "NOC: abuse block" in state.detail
        with pytest.raises(ForeignEntryError, match="did not create"):
            await driver.ensure_active("address-list", "10.20.0.11")
        assert sim.is_suspended_address("10.20.0.11"), "the NOC's entry stays"
        # suspend adds our own entry beside it? RouterOS refuses a second entry for one address: ours is the
        # foreign one then, and restore still leaves it
        await driver.ensure_suspended("address-list", "10.20.0.11")
    finally:
        await driver.aclose()
    permissive = make_driver(device_for(sim, own_entries_only=False), sim.password, Timeouts(1.0, 1.0))
    try:
        await permissive.ensure_active("address-list", "10.20.0.11")
        assert not sim.is_suspended_address("10.20.0.11"), "--no-own-entries-only: any entry of the list goes"
    finally:
        await permissive.aclose()


async def test_foreign_entry_job_reports_without_removing(wl_db: str, sim: RouterSimulator) -> None:
    await add_router(wl_db, sim)
    await add_customer(wl_db, "f1", "address-list", "10.20.0.11")
    sim.add(AL4, list="morosos", address="10.20.0.11", comment="NOC: abuse block")
    await enqueue(wl_db, DEACTIVATE, "f1", at(0))
    await enqueue(wl_db, ACTIVATE, "f1", at(1))
    await drain(wl_db)
    assert sim.items(AL4, address="10.20.0.11")[0]["comment"] == "NOC: abuse block"
    row = await service_row(wl_db, "f1")
    assert row.last_error is not None and "did not create" in row.last_error and row.applied_state != "active"
    assert len(await dlq(wl_db)) == 1
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        kinds = [h["kind"] for h in await list_history(conn, "f1")]
    assert "dead_letter" in kinds

    from wl_workers.reconcile import reconcile

    report = await reconcile(wl_db, fast_settings(), dry_run=False)
    assert [(d.service_id, d.fixable) for d in report.differences] == [("f1", False)] and report.enqueued == []


async def test_html_answer_and_refused_read_are_classified(sim: RouterSimulator) -> None:
    driver = make_driver(device_for(sim), sim.password, Timeouts(1.0, 1.0))
    try:
        sim.faults.html_next = 1
        with pytest.raises(TransientDeviceError, match="not JSON"):
            await driver.read_state("address-list", "10.20.0.11")
        with pytest.raises(PermanentDeviceError, match="refused to list"):
            await driver.api.print("no/such/menu")
    finally:
        await driver.aclose()


@contextlib.asynccontextmanager
async def fake_api_server(payload: bytes) -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read(1024)  # the login sentence
            writer.write(payload)
            await writer.drain()
            await reader.read(1024)  # until the client hangs up
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("byte", [0xF1, 0xF8, 0xFF])
async def test_binary_api_control_bytes_are_a_device_error(sim: RouterSimulator, byte: int) -> None:
    async with fake_api_server(bytes([byte]) + b"\x00\x00\x00\x00") as port:
        driver = make_driver(device_for(sim, "api", port=port), "pw", Timeouts(1.0, 1.0))
        try:
            with pytest.raises(TransientDeviceError, match=f"device r1 .*control byte 0x{byte:02X}"):
                await driver.read_state("address-list", "10.20.0.11")
        finally:
            await driver.aclose()


async def test_cli_device_add_own_entries_only_flag(wl_db: str, sim: RouterSimulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from wl_workers.cli import main

    monkeypatch.setenv("DATABASE_URL", wl_db)
    common = ["--host", "127.0.0.1", "--port", str(sim.port), "--scheme", "http", "--username", "api", "--password-ref", "env:X"]
    assert await asyncio.to_thread(main, ["device", "add", "strict", *common]) == 0
    assert await asyncio.to_thread(main, ["device", "add", "lax", *common, "--no-own-entries-only"]) == 0
    async with await psycopg.AsyncConnection.connect(wl_db, autocommit=True) as conn:
        cur = await conn.execute("SELECT name, own_entries_only FROM wl.devices ORDER BY name")
        assert await cur.fetchall() == [("lax", False), ("strict", True)]
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["service", "add", "x1", "--device", "strict", "--method", "address-list", "--target", "10.20.5.3/29"]) == 2
    assert "host bits set: the prefix is 10.20.5.0/29" in capsys.readouterr().err
