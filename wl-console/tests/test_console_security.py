"""Accounts and security over HTTP: login (and its throttling), sessions (idle timeout, logout, disabled
users, role changes), CSRF (token and cross-site), security headers, and escaping."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest

from console_helpers import PASSWORD, Harness, add_user_row, csrf_of, fetch_all, seed
from wl_console.accounts import (
    AccountError,
    Throttle,
    add_user,
    authenticate,
    set_disabled,
    set_password,
    validate_username,
)
from wl_console.security import CSP
from wl_console.sessions import PRE_SESSION_COOKIE, SESSION_COOKIE


async def _login(console: Harness, username: str, password: str, *, next_url: str = "/customers") -> tuple[int, str, dict[str, str]]:
    client = console.anonymous()
    page = await client.get("/login")
    assert page.status_code == 200
    response = await client.post("/login", data={"csrf_token": csrf_of(page.text), "username": username, "password": password, "next": next_url})
    return response.status_code, response.headers.get("location", "") or response.text, dict(client.cookies)


async def test_login_sets_a_new_signed_httponly_session(console: Harness) -> None:
    await add_user_row(console.url, "ana", "operator")
    client = console.anonymous()
    page = await client.get("/login")
    pre = client.cookies[PRE_SESSION_COOKIE]
    response = await client.post("/login", data={"csrf_token": csrf_of(page.text), "username": "ana", "password": PASSWORD, "next": "/routers"})
    assert response.status_code == 303
    assert response.headers["location"] == "/routers"
    cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "="))
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    token = client.cookies[SESSION_COOKIE]
    assert pre not in token
    rows = await fetch_all(console.url, "SELECT token_hash FROM console.sessions")
    assert len(rows) == 1 and token.split(".")[0] not in rows[0][0]  # only the hash is stored
    assert (await client.get("/customers")).status_code == 200
    audit = await fetch_all(console.url, "SELECT actor, action FROM console.audit")
    assert ("ana", "login") in audit


async def test_wrong_password_unknown_user_and_disabled_user_get_the_same_answer(console: Harness) -> None:
    await add_user_row(console.url, "ana", "operator")
    await add_user_row(console.url, "off", "operator", disabled=True)
    for username, password in (("ana", "wrong password!!"), ("nobody", PASSWORD), ("off", PASSWORD)):
        status, body, cookies = await _login(console, username, password)
        assert status == 401, username
        assert "Wrong user name or password." in body
        assert SESSION_COOKIE not in cookies


async def test_open_redirect_after_login_is_refused(console: Harness) -> None:
    await add_user_row(console.url, "ana", "viewer")
    for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        status, location, _ = await _login(console, "ana", PASSWORD, next_url=evil)
        assert (status, location) == (303, "/customers")


async def test_login_is_throttled_after_repeated_failures(console: Harness) -> None:
    await add_user_row(console.url, "ana", "operator")
    for _ in range(5):
        status, _, _ = await _login(console, "ana", "wrong password!!")
        assert status == 401
    status, body, _ = await _login(console, "ana", PASSWORD)  # right password, but too late
    assert status == 429
    assert "too many failed logins" in body
    console.clock.advance(901)  # the window has passed
    status, _, _ = await _login(console, "ana", PASSWORD)
    assert status == 303


async def test_authenticate_throttles_per_client_too(console_db: str) -> None:
    throttle = Throttle(max_failures=2, window=__import__("datetime").timedelta(minutes=15))
    now = datetime.now(UTC)
    async with await psycopg.AsyncConnection.connect(console_db, autocommit=True) as conn:
        await add_user(conn, "ana", "viewer", PASSWORD, actor="test")
        for i in range(8):  # a different (unknown) user name each time, all from one address
            assert await authenticate(conn, f"guess{i}", "x" * 12, "10.9.9.9", now=now, throttle=throttle) is None
        with pytest.raises(Exception, match="too many failed logins"):
            await authenticate(conn, "ana", PASSWORD, "10.9.9.9", now=now, throttle=throttle)
        assert await authenticate(conn, "ana", PASSWORD, "10.1.1.1", now=now, throttle=throttle) is not None


async def test_session_ends_after_the_idle_timeout(console: Harness) -> None:
    client = await console.client("viewer")
    assert (await client.get("/customers")).status_code == 200
    console.clock.advance(29 * 60)
    assert (await client.get("/customers")).status_code == 200  # each request counts as activity
    console.clock.advance(29 * 60)
    assert (await client.get("/customers")).status_code == 200
    console.clock.advance(31 * 60)
    response = await client.get("/customers?q=c1")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fcustomers%3Fq%3Dc1"
    assert await fetch_all(console.url, "SELECT 1 FROM console.sessions") == []


async def test_logout_is_post_only_and_ends_the_session(console: Harness) -> None:
    client = await console.client("viewer")
    assert (await client.get("/logout")).status_code == 405
    response = await client.post("/logout")
    assert (response.status_code, response.headers["location"]) == (303, "/login")
    assert (await client.get("/customers")).status_code == 303


async def test_role_and_disabled_flag_are_read_on_every_request(console: Harness) -> None:
    await seed(console.url)
    client = await console.client("operator", "bob")
    assert "data-action=\"change-state\"" in (await client.get("/customers/c1")).text
    async with await psycopg.AsyncConnection.connect(console.url, autocommit=True) as conn:
        await conn.execute("UPDATE console.users SET role = 'viewer' WHERE username = 'bob'")
    assert "data-action=\"change-state\"" not in (await client.get("/customers/c1")).text
    assert (await client.post("/customers/c1/refresh")).status_code == 403
    async with await psycopg.AsyncConnection.connect(console.url, autocommit=True) as conn:
        await set_disabled(conn, "bob", True, actor="test")
    assert (await client.get("/customers")).status_code == 303


async def test_password_change_ends_sessions_and_accounts_validate_input(console: Harness) -> None:
    client = await console.client("viewer", "carol")
    async with await psycopg.AsyncConnection.connect(console.url, autocommit=True) as conn:
        await set_password(conn, "carol", "a brand new password", actor="test")
        with pytest.raises(AccountError, match="at least 12"):
            await set_password(conn, "carol", "short", actor="test")
        with pytest.raises(AccountError, match="already exists"):
            await add_user(conn, "carol", "viewer", "another long password", actor="test")
        with pytest.raises(AccountError, match="role must be"):
            await add_user(conn, "dave", "root", "another long password", actor="test")
    with pytest.raises(AccountError):
        validate_username("Bad Name!")
    assert (await client.get("/customers")).status_code == 303
    hashes = await fetch_all(console.url, "SELECT password_hash FROM console.users WHERE username = 'carol'")
    assert hashes[0][0].startswith("$argon2id$")


async def test_post_without_csrf_token_is_refused_and_changes_nothing(console: Harness) -> None:
    await seed(console.url)
    client = await console.client("operator")
    response = await client.post("/customers/c1/action", {"action": "suspend", "reason": "unpaid", "confirm": "yes"}, csrf=False)
    assert response.status_code == 403
    assert "reload the page" in response.text
    response = await client.post("/customers/c1/action", {"action": "suspend", "reason": "unpaid", "confirm": "yes", "csrf_token": "forged"}, csrf=False)
    assert response.status_code == 403
    assert await fetch_all(console.url, "SELECT * FROM pgmq.q_device_actions") == []


async def test_cross_site_post_is_refused_even_with_the_token(console: Harness) -> None:
    await seed(console.url)
    client = await console.client("operator")
    form = {"action": "suspend", "reason": "unpaid", "confirm": "yes"}
    assert (await client.post("/customers/c1/action", form, headers={"sec-fetch-site": "cross-site"})).status_code == 403
    assert (await client.post("/customers/c1/action", form, headers={"origin": "https://evil.example"})).status_code == 403
    assert await fetch_all(console.url, "SELECT * FROM pgmq.q_device_actions") == []
    same = await client.post("/customers/c1/action", form, headers={"sec-fetch-site": "same-origin", "origin": "http://console.test"})
    assert same.status_code == 303


async def test_another_sessions_token_does_not_work(console: Harness) -> None:
    await seed(console.url)
    alice = await console.client("operator", "alice")
    mallory = await console.client("operator", "mallory")
    response = await alice.http.post("/customers/c1/refresh", data={"csrf_token": mallory.csrf})
    assert response.status_code == 403


async def test_security_headers_on_every_page(console: Harness) -> None:
    client = await console.client("viewer")
    for path in ("/login", "/customers", "/static/console.css", "/nope"):
        response = await client.get(path)
        assert response.headers["content-security-policy"] == CSP, path
        assert "frame-ancestors 'none'" in CSP and "unsafe-inline" not in CSP
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
    page = (await client.get("/customers")).text
    assert "<script>" not in page and "style=" not in page and " on" + "click" not in page  # nothing inline for the CSP to block


def test_production_hasher_is_argon2id_at_rfc_9106_cost() -> None:
    from argon2 import PasswordHasher, profiles

    assert PasswordHasher().time_cost == profiles.RFC_9106_LOW_MEMORY.time_cost
    stored = PasswordHasher().hash("x" * 12)
    assert stored.startswith("$argon2id$") and f"m={profiles.RFC_9106_LOW_MEMORY.memory_cost}" in stored


async def test_forged_cookie_is_not_a_session(console: Harness) -> None:
    client = console.anonymous()
    client.cookies.set(SESSION_COOKIE, "made-up-token.made-up-signature")
    assert (await client.get("/customers")).status_code == 303


async def test_expired_sessions_and_old_attempts_are_pruned_at_login(console: Harness) -> None:
    await add_user_row(console.url, "ana", "viewer")
    await console.client("viewer", "old")
    await _login(console, "ana", "wrong password!!")
    console.clock.advance(2 * 86400)
    status, _, _ = await _login(console, "ana", PASSWORD)
    assert status == 303
    sessions = await fetch_all(console.url, "SELECT u.username FROM console.sessions s JOIN console.users u ON u.id = s.user_id")
    assert sessions == [("ana",)]
    assert await fetch_all(console.url, "SELECT ok FROM console.login_attempts") == [(True,)]


async def test_a_schema_error_is_a_page_logged_and_counted(console: Harness) -> None:
    await seed(console.url)
    async with await psycopg.AsyncConnection.connect(console.url, autocommit=True) as conn:
        await conn.execute("ALTER TABLE wl.customer_services DROP COLUMN observed_state")  # an older wl schema
    client = await console.client("viewer")
    response = await client.get("/customers")
    assert response.status_code == 500
    assert "UndefinedColumn" in response.text and response.headers["content-security-policy"] == CSP
    metrics = (await client.get("/metrics")).text
    assert 'wl_console_errors_total{error="UndefinedColumn"} 1.0' in metrics
