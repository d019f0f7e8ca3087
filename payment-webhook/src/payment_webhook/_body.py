"""Reading a request body under a size limit, without reading more than the limit."""

from __future__ import annotations

from starlette.requests import Request


class BodyError(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, or BodyError(413) as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length over the limit is refused before any byte is read; a chunked (or lying) body is
    counted while it streams and refused at the first chunk past the limit.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BodyError(400, "bad_content_length", "Content-Length is not a number")
        if int(declared) > limit:
            raise BodyError(413, "body_too_large", f"body of {int(declared)} bytes is over the limit of {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BodyError(413, "body_too_large", f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
