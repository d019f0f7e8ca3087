"""Queues and dead letters: per-queue depth, oldest age, in flight, waiting for a retry; the dead letters of a
queue with their job's type, customer and error; show one; replay one or a selection (operator); purge
(admin only, after typing the queue's name)."""

from __future__ import annotations

import logging
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import _store
from ..permissions import Permission
from ..web import NotFound, console_of, form_of, redirect, render, require

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/queues")
MAX_SELECTION = 500


@router.get("", dependencies=[Depends(require(Permission.QUEUES_READ))])
async def queue_list(request: Request) -> Response:
    console = console_of(request)
    async with console.connection() as conn:
        stats = await _store.queue_stats(conn)
    return render(request, "queues/list.html", {"stats": stats})


async def _dlq(request: Request, queue: str) -> str:
    async with console_of(request).connection() as conn:
        dlq = await _store.resolve_dlq(conn, queue)
    if dlq is None:
        raise NotFound(f"no dead-letter queue for {queue!r}")
    return dlq


def dlq_url(queue: str) -> str:
    return f"/queues/{quote(queue, safe='')}/dead-letters"


async def _list_page(request: Request, queue: str, dlq: str, *, status: int = 200, error: str | None = None) -> Response:
    console = console_of(request)
    qp = request.query_params
    after = qp.get("after", "")
    query = _store.DeadLetterQuery(type=qp.get("type", "")[:100], service_id=qp.get("service_id", "")[:200], after=int(after) if after.isdigit() else None)
    async with console.connection() as conn:
        rows, more = await _store.list_dead_letters(conn, queue, dlq, query, console.settings.page_size)
    params = {k: v for k, v in {"type": query.type, "service_id": query.service_id}.items() if v}
    next_url = f"{dlq_url(queue)}?{urlencode({**params, 'after': more})}" if more is not None else None
    return render(request, "queues/dead_letters.html", {"queue": queue, "rows": rows, "query": query, "next_url": next_url,
                                                        "error": error, "url": dlq_url(queue)}, status=status)


@router.get("/{queue}/dead-letters", dependencies=[Depends(require(Permission.QUEUES_READ))])
async def dead_letter_list(request: Request, queue: str) -> Response:
    dlq = await _dlq(request, queue)
    return await _list_page(request, queue, dlq)


@router.get("/{queue}/dead-letters/{dlq_id}", dependencies=[Depends(require(Permission.QUEUES_READ))])
async def dead_letter_show(request: Request, queue: str, dlq_id: int) -> Response:
    dlq = await _dlq(request, queue)
    async with console_of(request).connection() as conn:
        letter = await _store.get_dead_letter(conn, queue, dlq, dlq_id)
    if letter is None:
        raise NotFound(f"no dead letter {dlq_id} in {dlq} (replayed or purged already?)")
    return render(request, "queues/dead_letter.html", {"d": letter, "queue": queue, "url": dlq_url(queue)})


def _selected(request: Request) -> list[int]:
    values = form_of(request).get("ids", [])
    ids = sorted({int(v) for v in values if v.strip().isdigit()})
    if not ids:
        raise _store.InputError("select at least one dead letter")
    if len(ids) > MAX_SELECTION:
        raise _store.InputError(f"select at most {MAX_SELECTION} dead letters at once")
    return ids


@router.post("/{queue}/dead-letters/replay", dependencies=[Depends(require(Permission.DEAD_LETTERS_REPLAY))])
async def dead_letter_replay(request: Request, queue: str) -> Response:
    console = console_of(request)
    actor = request.state.actor
    dlq = await _dlq(request, queue)
    try:
        ids = _selected(request)
        async with console.connection() as conn:
            moved = await _store.replay_dead_letters(conn, queue, dlq, ids, actor.username)
    except (_store.InputError, _store.DeadLettersGone) as exc:
        console.metrics.refusals.labels("bad_input").inc()
        return await _list_page(request, queue, dlq, status=400 if isinstance(exc, _store.InputError) else 409, error=str(exc))
    console.metrics.actions.labels("dead_letter.replay", "done").inc(len(moved.ids))
    logger.info("console_action", extra={"event": "console_action", "action": "dead_letter.replay", "queue": queue, "username": actor.username, "moved": moved.ids})
    text = ", ".join(f"{old} -> job {new}" for old, new in moved.ids)
    return redirect(request, dlq_url(queue), ("ok", f"Replayed {len(moved.ids)} dead letter(s) to {queue}: {text}."))


@router.post("/{queue}/dead-letters/purge", dependencies=[Depends(require(Permission.DEAD_LETTERS_PURGE))])
async def dead_letter_purge(request: Request, queue: str) -> Response:
    """Purge the selection (or every dead letter with ``all=yes``) once the queue's name was typed again."""
    console = console_of(request)
    actor = request.state.actor
    dlq = await _dlq(request, queue)
    form = form_of(request)
    everything = (form.get("all") or [""])[0] == "yes"
    typed = (form.get("confirm_name") or [""])[0].strip()
    try:
        ids = None if everything else _selected(request)
        if typed != queue:
            raise _store.InputError(f"type the queue's name ({queue}) to confirm the purge: purged dead letters are gone for good")
        async with console.connection() as conn:
            moved = await _store.purge_dead_letters(conn, queue, dlq, ids, actor.username)
    except (_store.InputError, _store.DeadLettersGone) as exc:
        console.metrics.refusals.labels("bad_input").inc()
        return await _list_page(request, queue, dlq, status=400 if isinstance(exc, _store.InputError) else 409, error=str(exc))
    console.metrics.actions.labels("dead_letter.purge", "done").inc(len(moved.ids))
    logger.warning("console_action", extra={"event": "console_action", "action": "dead_letter.purge", "queue": queue, "username": actor.username,
                                            "purged": [i for i, _ in moved.ids]})
    return redirect(request, dlq_url(queue), ("ok", f"Purged {len(moved.ids)} dead letter(s) of {queue}."))
