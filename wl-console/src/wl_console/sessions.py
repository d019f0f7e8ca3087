"""Sessions: a random token in a signed, HttpOnly, SameSite=Strict cookie; the database keeps its SHA-256.

The cookie is ``<token>.<HMAC-SHA256(key, "session:" + token)>``: a forged or altered cookie is refused before
the database is asked. A session ends after ``session_idle_minutes`` without a request, after
``session_max_hours`` in any case, at logout (POST), when the password changes or the account is disabled.
A new token is made at every login (no session fixation).

The CSRF token of a form is derived from the session token (``HMAC(key, "csrf:" + token)``): one per session,
checked by the middleware without a database read. Before login, a random pre-session cookie plays that role
for the login form.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from . import _sql
from .permissions import Permission, permissions_of

logger = logging.getLogger(__name__)

SESSION_COOKIE = "wlc_session"
PRE_SESSION_COOKIE = "wlc_pre"
FLASH_COOKIE = "wlc_flash"
TOUCH_EVERY = timedelta(seconds=60)  # last_seen_at is written at most this often per session


@dataclass(frozen=True)
class Actor:
    """The signed-in user, as read from the database on this request."""

    user_id: int
    username: str
    role: str
    token: str

    @property
    def permissions(self) -> frozenset[Permission]:
        return permissions_of(self.role)

    def can(self, permission: Permission | str) -> bool:
        return permission in self.permissions


class Signer:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, purpose: str, value: str) -> str:
        digest = hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, purpose: str, value: str) -> str:
        return f"{value}.{self._mac(purpose, value)}"

    def unsign(self, purpose: str, signed: str | None) -> str | None:
        if not signed or "." not in signed:
            return None
        value, _, mac = signed.rpartition(".")
        return value if hmac.compare_digest(mac, self._mac(purpose, value)) else None

    def csrf_token(self, token: str) -> str:
        return self._mac("csrf", token)

    def check_csrf(self, token: str | None, submitted: str) -> bool:
        return token is not None and bool(submitted) and hmac.compare_digest(self.csrf_token(token), submitted)

    # Flash messages travel in a signed cookie read (and cleared) by the next page.
    def dump_flashes(self, flashes: list[tuple[str, str]]) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(flashes).encode()).decode()
        return self.sign("flash", payload)

    def load_flashes(self, cookie: str | None) -> list[tuple[str, str]]:
        payload = self.unsign("flash", cookie)
        if payload is None:
            return []
        try:
            data = json.loads(base64.urlsafe_b64decode(payload.encode()))
            return [(str(kind), str(text)) for kind, text in data][:10]
        except (ValueError, TypeError):
            return []


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SessionPolicy:
    idle: timedelta
    max_age: timedelta


async def create_session(conn: psycopg.AsyncConnection[Any], user_id: int, client: str, now: datetime) -> str:
    token = new_token()
    await conn.execute(_sql.INSERT_SESSION, {"token_hash": token_hash(token), "user_id": user_id, "now": now, "client": client[:200]})
    return token


async def load_actor(conn: psycopg.AsyncConnection[Any], token: str, now: datetime, policy: SessionPolicy) -> Actor | None:
    """The session's user, re-read now; None (and the session deleted) when it expired or the user is disabled."""
    hashed = token_hash(token)
    cur = await conn.execute(_sql.GET_SESSION, (hashed,))
    row = await cur.fetchone()
    if row is None:
        return None
    user_id, username, role, disabled, created_at, last_seen_at = row
    if disabled or now - last_seen_at > policy.idle or now - created_at > policy.max_age:
        await conn.execute(_sql.DELETE_SESSION, (hashed,))
        logger.info("session_ended", extra={"event": "session_ended", "username": username, "why": "disabled" if disabled else "expired"})
        return None
    if now - last_seen_at > TOUCH_EVERY:
        await conn.execute(_sql.TOUCH_SESSION, {"token_hash": hashed, "now": now})
    return Actor(int(user_id), str(username), str(role), token)


async def end_session(conn: psycopg.AsyncConnection[Any], token: str) -> None:
    await conn.execute(_sql.DELETE_SESSION, (token_hash(token),))


async def prune(conn: psycopg.AsyncConnection[Any], now: datetime, policy: SessionPolicy, attempts_window: timedelta) -> None:
    await conn.execute(_sql.PRUNE_SESSIONS, {"idle_before": now - policy.idle, "created_before": now - policy.max_age})
    await conn.execute(_sql.PRUNE_ATTEMPTS, (now - max(attempts_window, timedelta(days=1)),))
