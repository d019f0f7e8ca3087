"""Log in (GET form, POST credentials), log out (POST only), and the front page."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from ..accounts import LoginThrottled, audit, authenticate
from ..permissions import Permission
from ..sessions import PRE_SESSION_COOKIE, SESSION_COOKIE, create_session, end_session, new_token, prune
from ..web import client_of, console_of, current_actor, field_of, redirect, render, require, safe_next

logger = logging.getLogger(__name__)
router = APIRouter()


@router.get("/")
async def home(request: Request) -> Response:
    actor = await current_actor(request)
    return RedirectResponse("/customers" if actor else "/login", status_code=303)


@router.get("/login")
async def login_form(request: Request) -> Response:
    console = console_of(request)
    pre = console.signer.unsign("pre", request.cookies.get(PRE_SESSION_COOKIE))
    new_pre = None
    if pre is None:
        new_pre = new_token()
        request.cookies[PRE_SESSION_COOKIE] = console.signer.sign("pre", new_pre)  # so that render derives the token
    response = render(request, "login.html", {"next": safe_next(request.query_params.get("next")), "username": "", "error": None})
    if new_pre is not None:
        response.set_cookie(PRE_SESSION_COOKIE, console.signer.sign("pre", new_pre), httponly=True, samesite="strict",
                            secure=console.settings.cookie_secure, path="/")
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    console = console_of(request)
    username, password = field_of(request, "username", limit=200), field_of(request, "password", limit=2000)
    next_url = safe_next(field_of(request, "next"))
    client = client_of(request)
    error = None
    status = 200
    async with console.connection() as conn:
        try:
            user = await authenticate(conn, username, password, client, now=console.now(), throttle=console.throttle)
        except LoginThrottled as exc:
            console.metrics.logins.labels("throttled").inc()
            user, error, status = None, str(exc), 429
        if user is None and error is None:
            console.metrics.logins.labels("failed").inc()
            error, status = "Wrong user name or password.", 401
        if user is not None:
            await prune(conn, console.now(), console.policy, console.throttle.window)  # a login is rare enough to tidy up on
            token = await create_session(conn, user.id, client, console.now())
            await audit(conn, user.username, "login", None, {"client": client})
    if user is None:
        return render(request, "login.html", {"next": next_url, "username": username, "error": error}, status=status)
    console.metrics.logins.labels("ok").inc()
    logger.info("login", extra={"event": "login", "username": user.username, "role": user.role, "client": client})
    response = redirect(request, next_url)
    response.set_cookie(SESSION_COOKIE, console.signer.sign("session", token), httponly=True, samesite="strict",
                        secure=console.settings.cookie_secure, path="/")
    response.delete_cookie(PRE_SESSION_COOKIE, path="/")
    return response


@router.post("/logout", dependencies=[Depends(require(Permission.SESSION))])
async def logout(request: Request) -> Response:
    console = console_of(request)
    actor = await current_actor(request)
    if actor is not None:
        async with console.connection() as conn:
            await end_session(conn, actor.token)
            await audit(conn, actor.username, "logout", None)
    response = redirect(request, "/login")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
