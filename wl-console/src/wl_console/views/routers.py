"""Routers: the list (last contact, last error, services, diverged, pending jobs), a router's page with its
services, and "test connection", which a worker performs (the console never talks to a router)."""

from __future__ import annotations

import logging
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import _store
from ..permissions import Permission
from ..web import NotFound, console_of, redirect, render, require

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/routers")


@router.get("", dependencies=[Depends(require(Permission.ROUTERS_READ))])
async def router_list(request: Request) -> Response:
    console = console_of(request)
    async with console.connection() as conn:
        routers = await _store.list_routers(conn)
    return render(request, "routers/list.html", {"routers": routers})


def router_url(name: str) -> str:
    return "/routers/" + quote(name, safe="")


@router.get("/{name}", dependencies=[Depends(require(Permission.ROUTERS_READ))])
async def router_detail(request: Request, name: str) -> Response:
    console = console_of(request)
    after = request.query_params.get("after", "")[:200]
    async with console.connection() as conn:
        found = await _store.list_routers(conn, name)
        if not found:
            raise NotFound(f"no router named {name!r}")
        query = _store.CustomerQuery(device=name, after=after)
        services, next_after = await _store.search_customers(conn, query, console.settings.page_size)
        tests = await _store.device_tests(conn, name)
    next_url = f"{router_url(name)}?{urlencode({'after': next_after})}" if next_after else None
    return render(request, "routers/detail.html", {"r": found[0], "services": services, "tests": tests, "next_url": next_url})


@router.post("/{name}/test", dependencies=[Depends(require(Permission.ROUTERS_TEST))])
async def router_test(request: Request, name: str) -> Response:
    console = console_of(request)
    actor = request.state.actor
    async with console.connection() as conn:
        if not await _store.device_exists(conn, name):
            raise NotFound(f"no router named {name!r}")
        request_id = await _store.enqueue_device_test(conn, name, actor.username)
    console.metrics.actions.labels("device.test", "enqueued").inc()
    logger.info("console_action", extra={"event": "console_action", "action": "device.test", "device": name, "username": actor.username, "request_id": request_id})
    return redirect(request, router_url(name), ("ok", f"Connection test of {name} queued (request {request_id}); its result appears below."))
