"""Who may do what: the role table pinned, every route declares a permission (or is public), and every role x
route pair answered over HTTP as the table says (a new route without a row here fails the first test)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute

from console_helpers import ROLES, Harness, add_dead_letter, console_settings, seed
from wl_console import ROLE_PERMISSIONS, Permission, create_app
from wl_console.app import PUBLIC_ROUTES
from wl_console.web import BASE_CONTEXT

P = Permission

# (method, path) -> the permission it needs (None: public). Every route of the app, no more, no less.
ROUTES: dict[tuple[str, str], Permission | None] = {
    ("GET", "/"): None,
    ("GET", "/login"): None,
    ("POST", "/login"): None,
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
    ("GET", "/metrics"): None,
    ("POST", "/logout"): P.SESSION,
    ("GET", "/customers"): P.CUSTOMERS_READ,
    ("GET", "/customers/{service_id:path}"): P.CUSTOMERS_READ,
    ("POST", "/customers/{service_id:path}/action"): P.CUSTOMERS_ACT,
    ("POST", "/customers/{service_id:path}/refresh"): P.CUSTOMERS_ACT,
    ("GET", "/routers"): P.ROUTERS_READ,
    ("GET", "/routers/{name}"): P.ROUTERS_READ,
    ("POST", "/routers/{name}/test"): P.ROUTERS_TEST,
    ("GET", "/payments"): P.PAYMENTS_READ,
    ("GET", "/queues"): P.QUEUES_READ,
    ("GET", "/queues/{queue}/dead-letters"): P.QUEUES_READ,
    ("GET", "/queues/{queue}/dead-letters/{dlq_id}"): P.QUEUES_READ,
    ("POST", "/queues/{queue}/dead-letters/replay"): P.DEAD_LETTERS_REPLAY,
    ("POST", "/queues/{queue}/dead-letters/purge"): P.DEAD_LETTERS_PURGE,
}

SAMPLE = {"{service_id:path}": "c1", "{name}": "r1", "{queue}": "device_actions", "{dlq_id}": "1"}


def _routes(routes: list[Any]) -> list[APIRoute]:
    """The app's API routes, through included routers (FastAPI 0.16x keeps those as lazy wrappers)."""
    found: list[APIRoute] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            found += _routes(included.routes)
        elif isinstance(route, APIRoute):
            found.append(route)
    return found


def _declared(app: Any) -> dict[tuple[str, str], Permission | None]:
    found: dict[tuple[str, str], Permission | None] = {}
    for route in _routes(app.routes):
        if not isinstance(route, APIRoute):
            continue
        permissions = [getattr(dep.call, "permission", None) for dep in route.dependant.dependencies]
        permissions = [p for p in permissions if p is not None]
        for method in (route.methods or set()) - {"HEAD"}:
            assert len(permissions) <= 1, f"{method} {route.path} declares several permissions"
            found[(method, route.path)] = permissions[0] if permissions else None
    return found


def test_role_table_is_pinned() -> None:
    assert {role: sorted(perms) for role, perms in ROLE_PERMISSIONS.items()} == {
        "viewer": sorted([P.CUSTOMERS_READ, P.ROUTERS_READ, P.PAYMENTS_READ, P.QUEUES_READ, P.SESSION]),
        "operator": sorted([P.CUSTOMERS_READ, P.ROUTERS_READ, P.PAYMENTS_READ, P.QUEUES_READ, P.SESSION,
                            P.CUSTOMERS_ACT, P.ROUTERS_TEST, P.DEAD_LETTERS_REPLAY]),
        "admin": sorted(list(Permission)),
    }


def test_every_route_declares_its_permission() -> None:
    app = create_app(console_settings(), conninfo="postgresql://unused")
    declared = _declared(app)
    assert declared == ROUTES
    public = {key for key, permission in declared.items() if permission is None}
    assert public == PUBLIC_ROUTES, "a route without a permission must be listed in PUBLIC_ROUTES"


def test_base_context_names() -> None:
    assert BASE_CONTEXT == ("actor", "can", "csrf_token", "flashes", "nav", "path", "P")


def _path(template: str) -> str:
    for key, value in SAMPLE.items():
        template = template.replace(key, value)
    return template


@pytest.mark.parametrize("role", ["anonymous", *ROLES])
async def test_role_x_route(console: Harness, role: str) -> None:
    await seed(console.url)
    await add_dead_letter(console.url, {"type": "service.deactivate", "service_id": "c1", "event_at": "2026-11-30T10:00:00+00:00"})
    client = None if role == "anonymous" else await console.client(role)
    allowed = ROLE_PERMISSIONS.get(role, frozenset())
    # logging out ends the session the other requests use: last
    for (method, template), permission in sorted(ROUTES.items(), key=lambda item: item[0] == ("POST", "/logout")):
        path = _path(template)
        if client is None:
            http = console.anonymous()
            csrf = console.signer.csrf_token("anonymous-pre")
            http.cookies.set("wlc_pre", console.signer.sign("pre", "anonymous-pre"))
            response = await (http.get(path) if method == "GET" else http.post(path, data={"csrf_token": csrf}))
        else:
            response = await (client.get(path) if method == "GET" else client.post(path, {}))
        where = f"{role} {method} {path}: {response.status_code}"
        if permission is None:
            assert response.status_code in (200, 303, 401), where  # public (a login without credentials: 401)
        elif client is None:
            assert response.status_code == (303 if method == "GET" else 401), where
            if method == "GET":
                assert response.headers["location"].startswith("/login?next="), where
        elif permission in allowed:
            assert response.status_code not in (401, 403), where
            assert response.status_code < 500, where
        else:
            assert response.status_code == 403, where
