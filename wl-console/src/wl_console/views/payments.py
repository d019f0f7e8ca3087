"""Payments: the webhook events with their outcome, linked to the customer's history."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import _store
from ..permissions import Permission
from ..web import console_of, render, require

router = APIRouter(prefix="/payments")


@router.get("", dependencies=[Depends(require(Permission.PAYMENTS_READ))])
async def payment_list(request: Request) -> Response:
    console = console_of(request)
    qp = request.query_params
    before = qp.get("before", "")
    outcome = qp.get("outcome", "")
    query = _store.PaymentQuery(q=qp.get("q", "")[:200], outcome=outcome if outcome in _store.OUTCOMES or outcome.startswith("rejected") else "",
                                service_id=qp.get("service_id", "")[:200], before=int(before) if before.isdigit() else None)
    async with console.connection() as conn:
        rows, more, available = await _store.list_payments(conn, query, console.settings.page_size)
    params = {k: v for k, v in {"q": query.q, "outcome": query.outcome, "service_id": query.service_id}.items() if v}
    next_url = f"/payments?{urlencode({**params, 'before': more})}" if more is not None else None
    return render(request, "payments/list.html", {"rows": rows, "query": query, "outcomes": _store.OUTCOMES, "next_url": next_url, "available": available})
