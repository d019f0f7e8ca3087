"""The RouterOS drivers (REST and binary API) against the simulator, over real HTTP/TCP: both methods both
ways, idempotence, concurrent changes, reboots between look-up and change, and the error classes."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from wl_helpers import changes
from wl_workers._store import Device, Method
from wl_workers.drivers import Driver, PermanentDeviceError, Timeouts, TransientDeviceError, make_driver
from wl_workers.simulator import RouterSimulator

AL = "ip/firewall/address-list"


def device_for(sim: RouterSimulator, **overrides: Any) -> Device:
    base = Device(
        id=1, name="r1", driver="routeros-rest", host="127.0.0.1", port=sim.port, scheme="http", ca_file=None, tls_insecure=False,
        username=sim.username, password_ref="env:X", max_concurrent=2, address_list="morosos",
    )
    return dataclasses.replace(base, **overrides)


def device_with(sim: RouterSimulator, kind: str) -> Device:
    if kind == "api":
        return device_for(sim, driver="routeros-api", port=sim.api_port)
    return device_for(sim)


@pytest.fixture(params=["rest", "api"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def driver(sim: RouterSimulator, kind: str) -> AsyncIterator[Driver]:
    d = make_driver(device_with(sim, kind), sim.password, Timeouts(connect=1.0, read=1.0))
    yield d
    await d.aclose()


async def test_address_list_suspend_and_restore(sim: RouterSimulator, driver: Driver) -> None:
    sim.add(AL, list="other", address="10.0.0.5")
    await driver.ensure_suspended("address-list", "10.0.0.5")
    assert sim.is_suspended_address("10.0.0.5")
    assert (await driver.read_state("address-list", "10.0.0.5")).state == "suspended"
    await driver.ensure_active("address-list", "10.0.0.5")
    assert not sim.items(AL, list="morosos")
    assert sim.items(AL, list="other", address="10.0.0.5"), "an entry of another list is not ours to touch"
    assert (await driver.read_state("address-list", "10.0.0.5")).state == "active"


async def test_pppoe_suspend_disables_secret_then_drops_session_and_restore_enables(sim: RouterSimulator, driver: Driver) -> None:
    sim.add("ppp/secret", name="ana", service="pppoe")
    sim.add("ppp/active", name="ana", address="10.30.0.9")
    await driver.ensure_suspended("pppoe", "ana")
    assert sim.items("ppp/secret", name="ana")[0]["disabled"] == "true"
    assert not sim.items("ppp/active", name="ana")
    methods = [(r.method, "secret" if "secret" in r.path else "active") for r in sim.requests if r.method in ("PATCH", "DELETE")]
    assert methods == [("PATCH", "secret"), ("DELETE", "active")], "the secret is disabled before the session goes"
    assert (await driver.read_state("pppoe", "ana")).state == "suspended"
    await driver.ensure_active("pppoe", "ana")
    assert sim.items("ppp/secret", name="ana")[0]["disabled"] == "false"
    assert (await driver.read_state("pppoe", "ana")).state == "active"


async def test_twice_equals_once(sim: RouterSimulator, driver: Driver) -> None:
    sim.add("ppp/secret", name="ana")
    cases: tuple[tuple[Method, str], ...] = (("address-list", "10.0.0.7"), ("pppoe", "ana"))
    for method, target in cases:
        await driver.ensure_suspended(method, target)
        after_first = (sim.items(AL), sim.items("ppp/secret"))
        sim.reset_counters()
        await driver.ensure_suspended(method, target)
        assert changes(sim) == [], "a second suspension changes nothing"
        assert (sim.items(AL), sim.items("ppp/secret")) == after_first
        await driver.ensure_active(method, target)
        sim.reset_counters()
        await driver.ensure_active(method, target)
        assert changes(sim) == []


async def test_entry_added_concurrently_counts_as_success(sim: RouterSimulator, driver: Driver) -> None:
    def someone_else_adds_it(method: str, path: str) -> None:
        if method == "PUT":
            sim.add(AL, list="morosos", address="10.0.0.8")

    sim.before_request = someone_else_adds_it
    await driver.ensure_suspended("address-list", "10.0.0.8")
    assert any(r.method == "PUT" and r.status == 400 for r in sim.requests), "the PUT met 'already have such entry'"
    assert len(sim.items(AL, address="10.0.0.8")) == 1


@pytest.mark.parametrize("method", ["DELETE", "PATCH"])
async def test_reboot_between_look_up_and_change(sim: RouterSimulator, driver: Driver, method: str) -> None:
    sim.add(AL, list="morosos", address="10.0.0.9", comment="wl-workers: suspended")
    sim.add("ppp/secret", name="ana", disabled="true")
    sim.faults.reboot_before[method] = 1
    if method == "DELETE":
        await driver.ensure_active("address-list", "10.0.0.9")
        assert not sim.items(AL, address="10.0.0.9")
    else:
        await driver.ensure_active("pppoe", "ana")
        assert sim.items("ppp/secret", name="ana")[0]["disabled"] == "false"
    assert sim.reboots == 1
    assert any(r.method == method and r.status == 404 for r in sim.requests), "the change aimed at the old .id first"


async def test_bad_credentials_are_permanent(sim: RouterSimulator, kind: str) -> None:
    d = make_driver(device_with(sim, kind), "wrong", Timeouts(1.0, 1.0))
    with pytest.raises(PermanentDeviceError, match="authentication failed"):
        await d.ensure_suspended("address-list", "10.0.0.1")
    await d.aclose()


async def test_missing_ppp_secret_is_permanent(driver: Driver) -> None:
    with pytest.raises(PermanentDeviceError, match="no PPP secret"):
        await driver.ensure_suspended("pppoe", "nobody")


async def test_transient_faults(sim: RouterSimulator, driver: Driver) -> None:
    sim.faults.fail_next = 1
    with pytest.raises(TransientDeviceError, match=r"HTTP 503|router closed the API session"):
        await driver.read_state("address-list", "10.0.0.1")
    sim.faults.drop_next = 1
    with pytest.raises(TransientDeviceError, match="connection failed"):
        await driver.read_state("address-list", "10.0.0.1")
    sim.faults.delay = 1.5
    with pytest.raises(TransientDeviceError, match="timeout"):
        await driver.read_state("address-list", "10.0.0.1")
    sim.faults.delay = 0
    sim.go_down()
    with pytest.raises(TransientDeviceError, match="connection failed"):
        await driver.read_state("address-list", "10.0.0.1")
    sim.come_up()
    assert (await driver.read_state("address-list", "10.0.0.1")).state == "active"


async def test_simulator_speaks_routeros(sim: RouterSimulator) -> None:
    async with httpx.AsyncClient(base_url=sim.url + "/rest", auth=(sim.username, sim.password)) as client:
        added = (await client.put("/ip/firewall/address-list", json={"list": "morosos", "address": "10.1.1.1", "disabled": False})).json()
        assert added[".id"].startswith("*") and added["disabled"] == "false"
        dup = await client.put("/ip/firewall/address-list", json={"list": "morosos", "address": "10.1.1.1"})
        assert (dup.status_code, dup.json()) == (400, {"error": 400, "message": "Bad Request", "detail": "failure: already have such entry"})
        gone = await client.patch("/ip/firewall/address-list/%2A999", json={"comment": "x"})
        assert gone.status_code == 404 and gone.json()["error"] == 404
        sim.reboot()
        listed = (await client.get("/ip/firewall/address-list", params={"address": "10.1.1.1"})).json()
        assert listed[0][".id"] != added[".id"], "a reboot renumbers .id"
        async with httpx.AsyncClient(base_url=sim.url) as anonymous:
            unauthorized = await anonymous.get("/rest/ppp/secret")
        assert (unauthorized.status_code, unauthorized.json()["message"]) == (401, "Unauthorized")
        control = await client.post(sim.url + "/__sim__/control", json={"action": "fail", "count": 1, "status": 500})
        assert control.status_code == 200
        assert (await client.get("/ppp/secret")).status_code == 500
        assert (await client.get("/ppp/secret")).status_code == 200


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_https_with_ca_file_and_insecure_switch(sim: RouterSimulator, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    await asyncio.to_thread(
        subprocess.run,
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    tls = RouterSimulator(username="api", password="pw", api=True)
    tls.start()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    assert tls._server is not None and tls._api_server is not None
    tls._server.socket = context.wrap_socket(tls._server.socket, server_side=True)
    tls._api_server.socket = context.wrap_socket(tls._api_server.socket, server_side=True)
    try:
        for kind in ("rest", "api"):
            base = device_with(tls, kind)
            trusted = make_driver(dataclasses.replace(base, scheme="https", ca_file=str(cert)), "pw", Timeouts(2, 2))
            assert (await trusted.read_state("address-list", "10.0.0.1")).state == "active", kind
            await trusted.aclose()
            untrusted = make_driver(dataclasses.replace(base, scheme="https"), "pw", Timeouts(2, 2))
            with pytest.raises(PermanentDeviceError, match="TLS certificate"):
                await untrusted.read_state("address-list", "10.0.0.1")
            await untrusted.aclose()
            insecure = make_driver(dataclasses.replace(base, scheme="https", tls_insecure=True), "pw", Timeouts(2, 2))
            assert (await insecure.read_state("address-list", "10.0.0.1")).state == "active", kind
            await insecure.aclose()
    finally:
        tls.stop()


def test_simulator_threads_stop(sim: RouterSimulator) -> None:
    sim.stop()
    assert not any(t.name == f"routeros-sim-{sim.port}" for t in threading.enumerate())
