"""Reading a request body under a size and time limit, and parsing it as JSON that can be stored."""

from __future__ import annotations

import json
import math
from typing import Any

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


# A genuine event is two or three levels deep and its numbers are short; these bounds are far above that and far
# below what costs the parser (or PostgreSQL's jsonb) anything.
MAX_DEPTH = 16
MAX_NUMBER_CHARS = 32


def _constant(name: str) -> Any:
    raise BodyError(400, "non_finite_number", f"{name} is not a JSON number")


def _number(text: str) -> None:
    if len(text) > MAX_NUMBER_CHARS:
        raise BodyError(400, "number_too_long", f"a number has {len(text)} characters (at most {MAX_NUMBER_CHARS})")


def _float(text: str) -> float:
    _number(text)
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(400, "number_out_of_range", "a number is beyond the range of a double")
    return value


def _int(text: str) -> int:
    _number(text)
    return int(text)


def _check_text(value: str) -> None:
    if "\x00" in value:
        raise BodyError(400, "invalid_string", "a string contains NUL (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BodyError(400, "invalid_string", "a string contains a lone surrogate") from None


def _check_tree(value: Any) -> None:
    """Depth and strings of a parsed body, iteratively (a deep body must not cost a deep Python stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise BodyError(400, "too_deep", f"nesting deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def parse_json(body: bytes) -> Any:
    """The body as JSON that PostgreSQL's jsonb and our schema can take, or BodyError(400) with a stable reason.

    Everything is refused here, before any database work: ``NaN``/``Infinity`` (not JSON, and jsonb refuses
    them: that was a 503 the provider retried forever), numbers that overflow a double or are absurdly long,
    NUL and lone surrogates (jsonb refuses both), and nesting beyond MAX_DEPTH (deep nesting was a 500).
    """
    try:
        text = body.decode("utf-8")  # strict: UTF-8-encoded surrogates are invalid here already
    except UnicodeDecodeError:
        raise BodyError(400, "malformed_json", "body is not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise BodyError(400, "too_deep", f"nesting deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise BodyError(400, "malformed_json", f"body is not JSON (line {exc.lineno}, column {exc.colno})") from None
    _check_tree(value)
    return value
