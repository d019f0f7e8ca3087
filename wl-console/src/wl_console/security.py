"""The two middlewares every response goes through: security headers, and CSRF for every unsafe method.

CSRF is checked once, here, for every POST (and any other unsafe method): first the browser's own word about
where the request came from (``Sec-Fetch-Site`` must be same-origin or none; else ``Origin``, when sent, must be
this host), then the per-session token that every form carries (``csrf_token``). The form body is read here
(bounded by ``max_form_bytes``), parsed once into ``request.state.form`` and handed on unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse

from .metrics import ConsoleMetrics
from .sessions import PRE_SESSION_COOKIE, SESSION_COOKIE, Signer

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FORM_TYPE = "application/x-www-form-urlencoded"

# No inline script or style anywhere: the pages use /static/console.css and /static/console.js only.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]


class SecurityHeaders:
    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in HEADERS if k not in names]
                if b"cache-control" not in names:
                    # pages show customer data: never kept by a shared cache or the browser's back button
                    headers.append((b"cache-control", b"no-store"))
                if self.hsts:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _refusal(status: int, text: str) -> HTMLResponse:
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Refused</title>"
        "<link rel=stylesheet href=/static/console.css></head><body><main class=page>"
        f"<h1>Refused</h1><p class=error>{text}</p><p><a href=/>Back to the console</a></p></main></body></html>"
    )
    return HTMLResponse(body, status_code=status)


class CSRFMiddleware:
    def __init__(self, app: ASGIApp, *, signer: Signer, metrics: ConsoleMetrics, max_body: int) -> None:
        self.app = app
        self.signer = signer
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        context = {"path": scope["path"], "method": scope["method"], "client": request.client.host if request.client else "-"}
        refused = self._cross_site(request)
        if refused is not None:
            self.metrics.refusals.labels("cross_site").inc()
            logger.warning("csrf_refused", extra={"event": "csrf_refused", "why": refused, **context})
            await _refusal(403, "This form did not come from this console (cross-site request).")(scope, receive, send)
            return
        body = await self._read(receive)
        if body is None:
            self.metrics.refusals.labels("too_large").inc()
            logger.warning("form_too_large", extra={"event": "form_too_large", **context})
            await _refusal(413, "The form is too large.")(scope, receive, send)
            return
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=2000) if content_type == FORM_TYPE else {}
        submitted = (form.get("csrf_token") or [""])[0]
        session = self.signer.unsign("session", request.cookies.get(SESSION_COOKIE))
        pre = self.signer.unsign("pre", request.cookies.get(PRE_SESSION_COOKIE))
        if not (self.signer.check_csrf(session, submitted) or self.signer.check_csrf(pre, submitted)):
            self.metrics.refusals.labels("csrf").inc()
            logger.warning("csrf_refused", extra={"event": "csrf_refused", "why": "token missing or wrong" if submitted else "no token", **context})
            await _refusal(403, "The form has expired or did not come from this console: reload the page and try again.")(scope, receive, send)
            return
        scope.setdefault("state", {})["form"] = {k: v for k, v in form.items() if k != "csrf_token"}
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _cross_site(request: Request) -> str | None:
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return f"sec-fetch-site {site}"
        origin = request.headers.get("origin")
        if origin is not None:
            host = request.headers.get("host", "")
            if origin == "null" or urlsplit(origin).netloc != host:
                return f"origin {origin[:100]} is not {host[:100]}"
        return None

    async def _read(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)
