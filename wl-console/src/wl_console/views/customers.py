"""Customers: search and filters, the customer page (desired / applied / observed, history), and the operator's
actions: suspend or activate with a required reason and a confirmation step, and "refresh from router"."""

from __future__ import annotations

import logging
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import _store
from ..permissions import Permission
from ..web import NotFound, console_of, field_of, redirect, render, require

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/customers")


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "") in ("1", "on", "true")


@router.get("", dependencies=[Depends(require(Permission.CUSTOMERS_READ))])
async def customer_list(request: Request) -> Response:
    console = console_of(request)
    qp = request.query_params
    query = _store.CustomerQuery(
        q=qp.get("q", "")[:200], device=qp.get("device", "")[:100], suspended=_flag(request, "suspended"), diverged=_flag(request, "diverged"),
        errors=_flag(request, "errors"), pending=_flag(request, "pending"), after=qp.get("after", "")[:200],
    )
    error = None
    rows: list[_store.Customer] = []
    next_after = None
    async with console.connection() as conn:
        try:
            rows, next_after = await _store.search_customers(conn, query, console.settings.page_size)
        except _store.InputError as exc:
            console.metrics.refusals.labels("bad_input").inc()
            error = str(exc)
    next_url = None
    if next_after is not None:
        next_url = "/customers?" + urlencode({**query.params(), "after": next_after})
    return render(request, "customers/list.html", {"query": query, "rows": rows, "next_url": next_url, "error": error},
                  status=400 if error else 200)


async def _load(request: Request, service_id: str) -> _store.Customer:
    console = console_of(request)
    async with console.connection() as conn:
        customer = await _store.get_customer(conn, service_id)
    if customer is None:
        raise NotFound(f"no customer service {service_id!r}")
    return customer


def customer_url(service_id: str) -> str:
    return "/customers/" + quote(service_id, safe="")


async def _detail(request: Request, customer: _store.Customer, *, status: int = 200, form: dict[str, str] | None = None,
                  error: str | None = None) -> Response:
    console = console_of(request)
    before_raw = request.query_params.get("before", "")
    before = int(before_raw) if before_raw.isdigit() else None
    async with console.connection() as conn:
        page = await _store.customer_page(conn, customer, before=before)
    context = {"page": page, "c": customer, "form": form or {"action": "", "reason": ""}, "error": error, "url": customer_url(customer.service_id)}
    return render(request, "customers/detail.html", context, status=status)


@router.post("/{service_id:path}/action", dependencies=[Depends(require(Permission.CUSTOMERS_ACT))])
async def customer_action(request: Request, service_id: str) -> Response:
    """Two steps without JavaScript: the first POST shows what will happen; the second (confirm=yes) enqueues."""
    console = console_of(request)
    actor = request.state.actor
    customer = await _load(request, service_id)
    action, reason = field_of(request, "action"), field_of(request, "reason", limit=5000)
    form = {"action": action, "reason": reason}
    try:
        if action not in _store.ACTIONS:
            raise _store.InputError("choose suspend or activate")
        _store.validate_reason(reason)
    except _store.InputError as exc:
        console.metrics.refusals.labels("bad_input").inc()
        return await _detail(request, customer, status=400, form=form, error=str(exc))
    if field_of(request, "confirm") != "yes":
        return render(request, "customers/confirm.html", {"c": customer, "form": form, "url": customer_url(customer.service_id),
                                                         "new_state": _store.ACTIONS[action][1]})
    async with console.connection() as conn:
        msg_id = await _store.enqueue_service_action(conn, customer, action, reason, actor.username, now=console.now())
    console.metrics.actions.labels(_store.ACTIONS[action][0], "enqueued").inc()
    logger.info("console_action", extra={"event": "console_action", "action": _store.ACTIONS[action][0], "service_id": customer.service_id,
                                         "username": actor.username, "msg_id": msg_id})
    return redirect(request, customer_url(customer.service_id),
                    ("ok", f"{action.capitalize()} of {customer.service_id} queued (job {msg_id}); a worker applies it on {customer.device}."))


@router.post("/{service_id:path}/refresh", dependencies=[Depends(require(Permission.CUSTOMERS_ACT))])
async def customer_refresh(request: Request, service_id: str) -> Response:
    console = console_of(request)
    actor = request.state.actor
    customer = await _load(request, service_id)
    async with console.connection() as conn:
        msg_id = await _store.enqueue_refresh(conn, customer, actor.username)
    console.metrics.actions.labels("service.refresh", "enqueued").inc()
    logger.info("console_action", extra={"event": "console_action", "action": "service.refresh", "service_id": customer.service_id,
                                         "username": actor.username, "msg_id": msg_id})
    return redirect(request, customer_url(customer.service_id), ("ok", f"A worker will read {customer.service_id} from {customer.device} (job {msg_id})."))


@router.get("/{service_id:path}", dependencies=[Depends(require(Permission.CUSTOMERS_READ))])
async def customer_detail(request: Request, service_id: str) -> Response:
    customer = await _load(request, service_id)
    return await _detail(request, customer)
