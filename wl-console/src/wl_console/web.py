"""What every view shares: the console object, who is signed in, permission checks, forms, flashes, rendering.

One view order everywhere: load (404), check (403), query through ``_sql.py``, build the context, render with
``render``, which adds the documented base context (``BASE_CONTEXT``). Routes declare their permission with
``dependencies=[Depends(require(Permission.X))]``; since no permission depends on the row shown, the 403 comes
before the 404 (a viewer learns nothing about what exists from a refused action).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import psycopg
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment
from psycopg_pool import AsyncConnectionPool

from .accounts import Throttle
from .metrics import ConsoleMetrics
from .permissions import Permission
from .sessions import FLASH_COOKIE, PRE_SESSION_COOKIE, SESSION_COOKIE, Actor, SessionPolicy, Signer, load_actor
from .settings import ConsoleSettings

logger = logging.getLogger(__name__)

# The names every template can use, whatever the view (a test pins this list).
BASE_CONTEXT = ("actor", "can", "csrf_token", "flashes", "nav", "path", "P")
NAV = (("Customers", "/customers", Permission.CUSTOMERS_READ), ("Routers", "/routers", Permission.ROUTERS_READ),
       ("Payments", "/payments", Permission.PAYMENTS_READ), ("Queues", "/queues", Permission.QUEUES_READ))


@dataclass
class Console:
    settings: ConsoleSettings
    signer: Signer
    metrics: ConsoleMetrics
    templates: Environment
    clock: Callable[[], float] = time.time
    pool: AsyncConnectionPool[Any] | None = field(default=None, repr=False)

    @property
    def policy(self) -> SessionPolicy:
        return SessionPolicy(idle=timedelta(minutes=self.settings.session_idle_minutes), max_age=timedelta(hours=self.settings.session_max_hours))

    @property
    def throttle(self) -> Throttle:
        return Throttle(self.settings.login_max_failures, timedelta(seconds=self.settings.login_window_seconds))

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self.pool is None:
            raise RuntimeError("the console is not running (its lifespan has not started)")
        async with self.pool.connection() as conn:
            yield conn


class NotSignedIn(Exception):
    pass


class Forbidden(Exception):
    def __init__(self, permission: Permission) -> None:
        super().__init__(f"your role does not allow {permission}")
        self.permission = permission


class NotFound(LookupError):
    pass


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def client_of(request: Request) -> str:
    return request.client.host if request.client else "-"


async def current_actor(request: Request) -> Actor | None:
    """The signed-in user of this request (read from the database once per request), or None."""
    if "actor" in request.state._state:
        cached: Actor | None = request.state.actor
        return cached
    console = console_of(request)
    token = console.signer.unsign("session", request.cookies.get(SESSION_COOKIE))
    actor = None
    if token is not None:
        async with console.connection() as conn:
            actor = await load_actor(conn, token, console.now(), console.policy)
    request.state.actor = actor
    return actor


def require(permission: Permission) -> Callable[[Request], Coroutine[Any, Any, Actor]]:
    """The dependency a route declares: signed in (else to the login page), with ``permission`` (else 403)."""

    async def check(request: Request) -> Actor:
        actor = await current_actor(request)
        console = console_of(request)
        if actor is None:
            console.metrics.refusals.labels("not_signed_in").inc()
            raise NotSignedIn
        if not actor.can(permission):
            console.metrics.refusals.labels("forbidden").inc()
            logger.warning("forbidden", extra={"event": "forbidden", "username": actor.username, "role": actor.role, "permission": str(permission), "path": request.url.path})
            raise Forbidden(permission)
        return actor

    check.permission = permission  # type: ignore[attr-defined]  # read by the route-table test
    return check


def form_of(request: Request) -> dict[str, list[str]]:
    """The POSTed form, parsed (and CSRF-checked) by the middleware."""
    form: dict[str, list[str]] = getattr(request.state, "form", {})
    return form


def field_of(request: Request, name: str, *, limit: int = 2000) -> str:
    values = form_of(request).get(name) or [""]
    return values[0].strip()[:limit]


def render(request: Request, template: str, context: Mapping[str, Any] | None = None, *, status: int = 200) -> HTMLResponse:
    console = console_of(request)
    actor: Actor | None = getattr(request.state, "actor", None)
    flashes = console.signer.load_flashes(request.cookies.get(FLASH_COOKIE))
    token = actor.token if actor else console.signer.unsign("pre", request.cookies.get(PRE_SESSION_COOKIE))
    base = {
        "actor": actor,
        "can": (lambda p: actor is not None and actor.can(p)),
        "csrf_token": console.signer.csrf_token(token) if token else "",
        "flashes": flashes,
        "nav": [(label, href) for label, href, p in NAV if actor is not None and actor.can(p)],
        "path": request.url.path,
        "P": Permission,
    }
    html = console.templates.get_template(template).render({**(context or {}), **base})
    response = HTMLResponse(html, status_code=status)
    if flashes:
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def redirect(request: Request, url: str, *flashes: tuple[str, str]) -> RedirectResponse:
    """303 to a GET, with messages for the next page."""
    response = RedirectResponse(url, status_code=303)
    if flashes:
        console = console_of(request)
        response.set_cookie(FLASH_COOKIE, console.signer.dump_flashes(list(flashes)), httponly=True, samesite="strict",
                            secure=console.settings.cookie_secure, path="/", max_age=300)
    return response


def login_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


def safe_next(value: str | None) -> str:
    """Only a path of this site (no scheme, no host, no //): an open redirect would make phishing easy."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/customers"
    return value
