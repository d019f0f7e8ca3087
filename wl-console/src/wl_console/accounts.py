"""Operator accounts: argon2id password hashes, login with throttling, and the audit trail of console writes.

A login that fails, for whatever reason, says only "wrong user name or password"; an unknown or disabled user
costs the same hash verification as a known one, so timing does not tell which user names exist.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from psycopg.types.json import Jsonb

from . import _sql
from .permissions import ROLES

logger = logging.getLogger(__name__)

USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
MIN_PASSWORD = 12
MAX_PASSWORD = 1024  # argon2 takes any length; a megabyte "password" would only cost us CPU

AConn = psycopg.AsyncConnection[Any]

_hasher = PasswordHasher()  # argon2id with the library's RFC 9106 defaults
_dummy: dict[str, str] = {}


def use_hasher(hasher: PasswordHasher) -> None:
    """Replace the hasher (tests use cheap parameters; the stored hashes name their own parameters)."""
    global _hasher
    _hasher = hasher
    _dummy.clear()


def _dummy_hash() -> str:
    """Verified against when the user does not exist, so that the answer takes as long as for a real user."""
    if "hash" not in _dummy:
        _dummy["hash"] = _hasher.hash("no such user: a fixed password that nobody can log in with")
    return _dummy["hash"]


class AccountError(ValueError):
    """Bad input for an account command (clear one-line message, nothing changed)."""


class LoginThrottled(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins: try again in {max(1, round(retry_after / 60))} minute(s)")
        self.retry_after = retry_after


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: str
    disabled: bool


def validate_username(username: str) -> str:
    name = username.strip().lower()
    if not USERNAME.match(name):
        raise AccountError("user name: 1-64 characters, lower-case letters, digits and . _ @ - (starting with a letter or digit)")
    return name


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def validate_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"password must be at least {MIN_PASSWORD} characters long")
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"password must be at most {MAX_PASSWORD} characters long")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(validate_password(password))


async def audit(conn: AConn, actor: str, action: str, target: str | None, detail: dict[str, Any] | None = None) -> None:
    await conn.execute(_sql.INSERT_AUDIT, {"actor": actor, "action": action, "target": target, "detail": Jsonb(detail or {})})


async def add_user(conn: AConn, username: str, role: str, password: str, *, actor: str) -> int:
    name, role = validate_username(username), validate_role(role)
    params = {"username": name, "role": role, "password_hash": hash_password(password)}
    async with conn.transaction():
        try:
            cur = await conn.execute(_sql.INSERT_USER, params)
        except psycopg.errors.UniqueViolation:
            raise AccountError(f"user {name!r} already exists (use `wl-console user passwd` to change the password)") from None
        row = await cur.fetchone()
        assert row is not None
        await audit(conn, actor, "user.add", name, {"role": role})
    return int(row[0])


async def _update_one(conn: AConn, statement: str, params: dict[str, Any], name: str) -> None:
    cur = await conn.execute(statement, params)
    if await cur.fetchone() is None:
        raise AccountError(f"no user named {name!r}")


async def set_password(conn: AConn, username: str, password: str, *, actor: str) -> None:
    """A new password also ends the user's open sessions."""
    name = validate_username(username)
    async with conn.transaction():
        await _update_one(conn, _sql.SET_PASSWORD, {"username": name, "password_hash": hash_password(password)}, name)
        await conn.execute(_sql.DELETE_USER_SESSIONS, (name,))
        await audit(conn, actor, "user.passwd", name)


async def set_disabled(conn: AConn, username: str, disabled: bool, *, actor: str) -> None:
    """Disabling also ends the user's open sessions (and every request re-reads the flag anyway)."""
    name = validate_username(username)
    async with conn.transaction():
        await _update_one(conn, _sql.SET_DISABLED, {"username": name, "disabled": disabled}, name)
        if disabled:
            await conn.execute(_sql.DELETE_USER_SESSIONS, (name,))
        await audit(conn, actor, "user.disable" if disabled else "user.enable", name)


async def set_role(conn: AConn, username: str, role: str, *, actor: str) -> None:
    name, role = validate_username(username), validate_role(role)
    async with conn.transaction():
        cur = await conn.execute(_sql.GET_USER, (name,))
        old = await cur.fetchone()
        if old is None:
            raise AccountError(f"no user named {name!r}")
        await _update_one(conn, _sql.SET_ROLE, {"username": name, "role": role}, name)
        await audit(conn, actor, "user.role", name, {"old": old[2], "new": role})


async def list_users(conn: AConn) -> list[dict[str, Any]]:
    cur = await conn.execute(_sql.LIST_USERS)
    return [dict(zip(("username", "role", "disabled", "created_at", "password_changed_at"), row, strict=True)) for row in await cur.fetchall()]


@dataclass(frozen=True)
class Throttle:
    max_failures: int
    window: timedelta

    @property
    def max_client_failures(self) -> int:
        # one address may be a whole office behind NAT: a few mistyped passwords each before it is shut out
        return self.max_failures * 4


async def authenticate(conn: AConn, username: str, password: str, client: str, *, now: datetime, throttle: Throttle) -> User | None:
    """The user if the password is right and the account enabled; None otherwise. Raises LoginThrottled (without
    checking the password) after too many recent failures for this user name or this client address."""
    name = username.strip().lower()[:64]
    cur = await conn.execute(_sql.RECENT_FAILURES, {"username": name, "client": client, "since": now - throttle.window})
    row = await cur.fetchone()
    by_user, by_client = (int(row[0]), int(row[1])) if row else (0, 0)
    if by_user >= throttle.max_failures or by_client >= throttle.max_client_failures:
        logger.warning("login_throttled", extra={"event": "login_throttled", "username": name, "client": client, "failures_user": by_user, "failures_client": by_client})
        raise LoginThrottled(throttle.window.total_seconds())
    cur = await conn.execute(_sql.GET_USER, (name,))
    found = await cur.fetchone()
    ok = False
    user: User | None = None
    if len(password) <= MAX_PASSWORD:
        stored = str(found[3]) if found is not None else _dummy_hash()
        try:
            ok = _hasher.verify(stored, password) and found is not None and not found[4]
        except (VerificationError, InvalidHashError):
            ok = False
    if ok and found is not None:
        user = User(int(found[0]), str(found[1]), str(found[2]), bool(found[4]))
        if _hasher.check_needs_rehash(str(found[3])):  # parameters were raised since: upgrade the stored hash
            await conn.execute(_sql.SET_PASSWORD, {"username": name, "password_hash": _hasher.hash(password)})
    await conn.execute(_sql.INSERT_ATTEMPT, {"now": now, "username": name, "client": client, "ok": ok})
    if not ok:
        logger.warning("login_failed", extra={"event": "login_failed", "username": name, "client": client})
    return user
