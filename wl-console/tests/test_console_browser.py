"""The console in a real browser: Debian's chromium driven by Playwright, against ``wl-console serve`` on a free
port of 127.0.0.1, a RouterOS simulator and a ``wl-workers run`` worker (both started here) on one database.

One browser, one set of servers for the module; each test opens its own browser context (its own cookies).
Screenshots of every page at a 390 px wide viewport are kept in ``$WL_CONSOLE_ARTEFACTS`` (default: a
``wl-console-artefacts`` directory in the system's temporary directory), for a person to look at.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, sync_playwright

from console_fixtures import TEMPLATE
from console_helpers import PASSWORD, SECRET_KEY, add_dead_letter_sync, add_user_row
from pg_worker.testing import PgServer
from wl_workers.simulator import RouterSimulator

CHROMIUM = Path(os.environ.get("WL_CONSOLE_CHROMIUM", "/usr/bin/chromium"))
ARTEFACTS = Path(os.environ.get("WL_CONSOLE_ARTEFACTS") or Path(tempfile.gettempdir()) / "wl-console-artefacts")
ROUTER_PASSWORD = "browser-test-router-pw"
XSS_ID = "<script>alert(1)</script>"
BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} missing: run ./scripts/ci-system-packages as root (Debian package chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass
class System:
    base: str
    db: str
    sim: RouterSimulator

    def rows(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db, autocommit=True) as conn:
            return list(conn.execute(query, params).fetchall())


async def _seed(db: str, sim: RouterSimulator) -> None:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        from wl_workers._store import add_device, add_service

        await add_device(conn, name="r1", host="127.0.0.1", port=sim.port, scheme="http", username=sim.username, password_ref="env:WL_BROWSER_ROUTER_PASSWORD")
        await add_service(conn, "c1", "r1", "address-list", "10.0.0.11")
        await add_service(conn, "c2", "r1", "address-list", "10.0.0.12")
        # a service id from before wl's migration 0005 (its id pattern is NOT VALID: older rows stay as they were)
        await conn.execute("ALTER TABLE wl.customer_services DROP CONSTRAINT IF EXISTS customer_services_service_id_pattern")
        await conn.execute("INSERT INTO wl.customer_services (service_id, device_id, method, target) SELECT %s, id, 'pppoe', 'user-x' FROM wl.devices",
                           (XSS_ID,))
        await conn.execute("UPDATE wl.customer_services SET applied_state = 'active', applied_generation = 1, observed_state = 'active'")
        await conn.execute("INSERT INTO webhook.events (provider, event_id, type, payload, outcome, service_id, payment_id, amount, currency) "
                           "VALUES ('standard', 'ev-1', 'payment.approved', '{}', 'accepted', 'c1', 'pay-1', 100, 'ARS')")
    for role in ("viewer", "operator", "admin"):
        await add_user_row(db, role, role)


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:  # the child keeps its own descriptor
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def system(console_pg: PgServer) -> Iterator[System]:
    with console_pg.clone(TEMPLATE, prefix="console_browser") as db:
        yield from _system(db)


def _system(db: str) -> Iterator[System]:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    sim = RouterSimulator(username="api", password=ROUTER_PASSWORD).start()
    asyncio.run(_seed(db, sim))
    port = free_port()
    env = {**os.environ, "DATABASE_URL": db, "WL_CONSOLE_SECRET_KEY": SECRET_KEY, "WL_CONSOLE_COOKIE_SECURE": "false", "WL_CONSOLE_PORT": str(port),
           "WL_BROWSER_ROUTER_PASSWORD": ROUTER_PASSWORD, "PG_WORKER_METRICS": "false", "PG_WORKER_LOG_FORMAT": "console", "WL_CONSOLE_LOG_FORMAT": "console"}
    server = _spawn([str(BIN / "wl-console"), "serve"], env, ARTEFACTS / "wl-console.log")
    worker = _spawn([str(BIN / "wl-workers"), "run"], env, ARTEFACTS / "wl-workers.log")
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/readyz") or server.poll() is not None, "wl-console serve")
        assert server.poll() is None, f"wl-console serve exited: see {ARTEFACTS / 'wl-console.log'}"
        yield System(f"http://127.0.0.1:{port}", db, sim)
    finally:
        for proc in (worker, server):
            proc.terminate()
        for proc in (worker, server):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sim.stop()


@pytest.fixture(scope="module")
def browser(system: System) -> Iterator[Browser]:  # after the servers: their set-up runs asyncio, which the sync API forbids later
    with sync_playwright() as playwright:
        # Debian's chromium, never a downloaded build; no sandbox: CI runs as root
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    ctx.set_default_timeout(15_000)
    yield ctx
    ctx.close()


def log_in(page: Page, base: str, username: str, password: str = PASSWORD) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def test_log_in_and_wrong_password(system: System, context: BrowserContext) -> None:
    page = context.new_page()
    log_in(page, system.base, "operator", "not the password")
    assert page.get_by_role("alert").inner_text() == "Wrong user name or password."
    assert page.url.endswith("/login")
    log_in(page, system.base, "operator")
    page.wait_for_url(f"{system.base}/customers")
    assert page.locator("[data-user]").inner_text() == "operator (operator)"
    assert page.locator("tr[data-service-id]").count() == 3


def test_viewer_sees_no_actions_and_a_forged_post_is_refused(system: System, context: BrowserContext) -> None:
    page = context.new_page()
    log_in(page, system.base, "viewer")
    page.wait_for_url(f"{system.base}/customers")
    page.goto(f"{system.base}/customers/c1")
    assert page.locator("[data-action]").count() == 0
    page.goto(f"{system.base}/routers/r1")
    assert page.locator("[data-action]").count() == 0
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    assert token
    # the viewer's own, valid session and CSRF token: refused for the role
    response = context.request.post(f"{system.base}/customers/c1/action", form={"csrf_token": token, "action": "suspend", "reason": "forged", "confirm": "yes"})
    assert response.status == 403
    assert system.rows("SELECT 1 FROM pgmq.q_device_actions") == []


def test_operator_suspends_a_customer_and_the_router_changes(system: System, context: BrowserContext) -> None:
    page = context.new_page()
    log_in(page, system.base, "operator")
    page.wait_for_url(f"{system.base}/customers")
    page.get_by_role("link", name="c1", exact=True).click()
    page.get_by_label("Suspend").check()
    page.get_by_label("Reason").fill("unpaid since May <b>really</b>")
    page.get_by_role("button", name="Continue").click()
    assert "unpaid since May <b>really</b>" in page.locator("[data-field=reason]").inner_text()
    page.get_by_role("button", name="Yes, suspend").click()
    page.wait_for_url(f"{system.base}/customers/c1")
    assert "queued" in page.get_by_role("status").inner_text()
    wait_for(lambda: system.sim.is_suspended_address("10.0.0.11"), "the worker to suspend c1 on the simulated router")
    wait_for(lambda: system.rows("SELECT applied_state FROM wl.customer_services WHERE service_id = 'c1'") == [("suspended",)], "applied_state")
    page.reload()
    operator_row = page.locator('li[data-kind="operator"]').first
    assert operator_row.locator("[data-field=actor]").inner_text() == "operator"
    assert operator_row.locator("[data-field=reason]").inner_text() == "unpaid since May <b>really</b>"
    assert page.locator('[data-field="applied"] .state').inner_text() == "suspended"


def test_a_dead_letter_is_replayed(system: System, context: BrowserContext) -> None:
    # a suspension that died (say the router was down for half an hour): replayed, the worker applies it now
    now = datetime.now(UTC).isoformat()
    dlq_id = add_dead_letter_sync(system.db, {"type": "service.deactivate", "service_id": "c2", "event_at": now, "reason": "unpaid"})
    page = context.new_page()
    log_in(page, system.base, "operator")
    page.wait_for_url(f"{system.base}/customers")
    page.get_by_role("link", name="Queues").click()
    page.locator('tr[data-queue="device_actions"] a').click()
    page.get_by_label(f"select {dlq_id}").check()
    page.get_by_role("button", name="Replay selected").click()
    assert "Replayed 1 dead letter" in page.get_by_role("status").inner_text()
    assert page.locator(f'tr[data-dlq-id="{dlq_id}"]').count() == 0
    wait_for(lambda: system.sim.is_suspended_address("10.0.0.12"), "the replayed suspension to reach the router")


def test_a_post_without_the_csrf_token_is_refused(system: System, context: BrowserContext) -> None:
    page = context.new_page()
    log_in(page, system.base, "admin")
    page.wait_for_url(f"{system.base}/customers")
    response = context.request.post(f"{system.base}/customers/c2/action", form={"action": "suspend", "reason": "no token", "confirm": "yes"})
    assert response.status == 403
    assert "reload the page" in response.text()
    assert system.rows("SELECT 1 FROM wl.service_history WHERE reason = 'no token'") == []


def test_script_in_a_service_id_and_a_reason_renders_as_text(system: System, context: BrowserContext) -> None:
    dialogs: list[str] = []
    page = context.new_page()

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    log_in(page, system.base, "operator")
    page.wait_for_url(f"{system.base}/customers")
    page.get_by_role("link", name=XSS_ID).click()
    assert page.locator("h1").inner_text() == XSS_ID
    page.get_by_label("Suspend").check()
    page.get_by_label("Reason").fill("<script>alert(2)</script>")
    page.get_by_role("button", name="Continue").click()
    page.get_by_role("button", name="Yes, suspend").click()
    assert page.locator('li[data-kind="operator"] [data-field=reason]').first.inner_text() == "<script>alert(2)</script>"
    assert page.locator("script").count() == 1  # only /static/console.js
    assert dialogs == []


PAGES = ("/login", "/customers", "/customers/c1", "/routers", "/routers/r1", "/payments", "/queues", "/queues/device_actions/dead-letters")


def test_every_page_fits_a_390_px_phone(system: System, browser: Browser) -> None:
    dlq_id = add_dead_letter_sync(system.db, {"type": "service.deactivate", "service_id": "c1", "event_at": "2026-11-30T10:00:00+00:00"})
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1)
    try:
        page = ctx.new_page()
        page.goto(f"{system.base}/login")
        _check_width(page, "login")
        log_in(page, system.base, "admin")
        page.wait_for_url(f"{system.base}/customers")
        for path in (*PAGES[1:], f"/queues/device_actions/dead-letters/{dlq_id}"):
            page.goto(system.base + path)
            _check_width(page, path.strip("/").replace("/", "_") or "home")
    finally:
        ctx.close()


def _check_width(page: Page, name: str) -> None:
    shot = ARTEFACTS / f"390px-{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    scroll, client = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert scroll <= client, f"{name}: horizontal scroll ({scroll} px of content in {client} px); see {shot}"


def teardown_module() -> None:
    # keep the artefacts, drop what only the servers wrote when everything passed
    for log in ("wl-console.log", "wl-workers.log"):
        path = ARTEFACTS / log
        if path.exists() and path.stat().st_size == 0:
            path.unlink()
    shutil.rmtree(ARTEFACTS / "tmp", ignore_errors=True)
