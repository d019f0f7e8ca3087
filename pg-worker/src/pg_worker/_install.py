"""``pg-worker install``: pgmq, pg-worker's own schema, the queues and their wakeup triggers.

Idempotent and safe to run from several processes at once: everything happens in one transaction behind a
global advisory lock, and each step is skipped when it is already in place, so a second run changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from . import _sql
from ._names import dlq_name, validate_queue_name

logger = logging.getLogger(__name__)


Params = Sequence[Any] | Mapping[str, Any] | None


class SetupError(RuntimeError):
    """The database is not (and cannot be made) ready for pg-worker."""


@dataclass
class InstallReport:
    pgmq_version: str = ""
    pgmq_source: str = ""  # "extension", "sql" or "present"
    created_queues: list[str] = field(default_factory=list)
    created_triggers: list[str] = field(default_factory=list)
    schema_created: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.pgmq_source in ("extension", "sql") or self.created_queues or self.created_triggers or self.schema_created)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _require_recent(version: str, where: str) -> None:
    if _version_tuple(version) < _sql.MIN_PGMQ_VERSION:
        minimum = ".".join(map(str, _sql.MIN_PGMQ_VERSION))
        raise SetupError(
            f"pgmq {version} ({where}) is too old: pg-worker needs pgmq {minimum} or newer "
            "(messages gained last_read_at in 1.10). Upgrade pgmq, e.g. use the image ghcr.io/pgmq/pg18-pgmq:v1.13.0."
        )


async def _scalar(conn: psycopg.AsyncConnection[tuple[object, ...]], query: str, params: Params = None) -> object:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    return None if row is None else row[0]


async def _ensure_pgmq(conn: psycopg.AsyncConnection[tuple[object, ...]], report: InstallReport) -> None:
    installed = await _scalar(conn, _sql.PGMQ_EXTENSION_VERSION)
    if installed is not None:
        _require_recent(str(installed), "installed extension")
        report.pgmq_version, report.pgmq_source = str(installed), "present"
        return
    if await _scalar(conn, _sql.PGMQ_SCHEMA_EXISTS):
        if not await _scalar(conn, _sql.PGMQ_HAS_LAST_READ_AT):
            raise SetupError(
                "the database has a pgmq schema older than 1.10 (installed from SQL, no last_read_at column); "
                "pg-worker needs pgmq 1.10 or newer and SQL-only installs cannot be upgraded in place"
            )
        recorded = await _scalar(conn, _sql.GET_META, ("pgmq_sql_version",)) if await _has_meta(conn) else None
        report.pgmq_version, report.pgmq_source = str(recorded or "unknown (>= 1.10)"), "present"
        return
    available = await _scalar(conn, _sql.PGMQ_AVAILABLE_VERSION)
    if available is not None:
        _require_recent(str(available), "extension offered by this server")
        await conn.execute(_sql.CREATE_PGMQ_EXTENSION)
        report.pgmq_version = str(await _scalar(conn, _sql.PGMQ_EXTENSION_VERSION))
        report.pgmq_source = "extension"
        return
    import pgmq  # only here: importing it costs every worker's start-up ~0.1 s of CPU

    version = pgmq.get_embedded_sql_version()
    await conn.execute(pgmq.get_embedded_install_sql())
    report.pgmq_version, report.pgmq_source = version, "sql"


async def _has_meta(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> bool:
    return bool(await _scalar(conn, "SELECT to_regclass('pgworker.meta') IS NOT NULL"))


async def _ensure_schema(conn: psycopg.AsyncConnection[tuple[object, ...]], report: InstallReport) -> None:
    current = await _schema_version(conn)
    if current is not None and current > _sql.SCHEMA_VERSION:
        raise SetupError(_newer_schema(current))
    function_ok = await _scalar(conn, _sql.WAKEUP_FUNCTION_OK)
    if current == _sql.SCHEMA_VERSION and function_ok:
        return
    await conn.execute(_sql.SCHEMA_DDL)
    await conn.execute(_sql.SET_META, ("schema_version", str(_sql.SCHEMA_VERSION)))
    report.schema_created = True


async def _schema_version(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int | None:
    value = await _scalar(conn, _sql.GET_META, ("schema_version",)) if await _has_meta(conn) else None
    return None if value is None else int(str(value))


def _newer_schema(found: int) -> str:
    return (
        f"the database has pg-worker schema version {found}, newer than this pg-worker's {_sql.SCHEMA_VERSION}: "
        "a newer pg-worker installed it; upgrade this one instead (pg-worker never downgrades a schema)"
    )


async def _ensure_queue(conn: psycopg.AsyncConnection[tuple[object, ...]], queue: str, report: InstallReport) -> None:
    for name in (queue, dlq_name(queue)):
        if not await _scalar(conn, _sql.QUEUE_EXISTS, (name,)):
            await conn.execute(_sql.CREATE_QUEUE, (name,))
            report.created_queues.append(name)
    trigger_ok = await _scalar(
        conn, _sql.WAKEUP_TRIGGER_OK, {"table": _sql.qualified_queue_table(queue), "queue": queue}
    )
    if not trigger_ok:
        await conn.execute(_sql.create_wakeup_trigger(queue))
        report.created_triggers.append(queue)


async def install(conninfo: str, queues: Iterable[str], *, lock_timeout: float = 10.0, grant_to: Iterable[str] = ()) -> InstallReport:
    """Make the database ready for workers of ``queues``; returns what it had to do.

    ``grant_to``: roles that run workers without owning anything (least privilege): they get exactly the
    rights a worker of these queues needs.

    ``lock_timeout``: how long a DDL statement may wait for a lock (a long transaction on a queue) before
    install fails, instead of queueing every producer and worker of that queue behind its lock request."""
    names = [validate_queue_name(q) for q in queues]
    report = InstallReport()
    async with await psycopg.AsyncConnection.connect(conninfo) as conn, conn.transaction():
        await conn.execute(_sql.INSTALL_LOCK)
        # DDL waits for every reader of a queue table: a long-running transaction must make install fail
        # clearly, not stall the queue behind an ACCESS EXCLUSIVE lock request.
        await conn.execute(_sql.SET_LOCK_TIMEOUT, (f"{int(lock_timeout * 1000)}ms",))
        await _ensure_pgmq(conn, report)
        await _ensure_schema(conn, report)
        if report.pgmq_source == "sql":
            await conn.execute(_sql.SET_META, ("pgmq_sql_version", report.pgmq_version))
        for name in names:
            await _ensure_queue(conn, name, report)
            for role in grant_to:
                await conn.execute(_sql.grant_worker(role, name))
    logger.info(
        "install_finished",
        extra={
            "event": "install_finished",
            "pgmq_version": report.pgmq_version,
            "pgmq_source": report.pgmq_source,
            "created_queues": report.created_queues,
            "created_triggers": report.created_triggers,
        },
    )
    return report


async def check_setup(conn: psycopg.AsyncConnection[tuple[object, ...]], queues: Iterable[str]) -> list[str]:
    """What is missing for workers of ``queues`` (empty when all is in place). Read-only."""
    problems: list[str] = []
    if not await _scalar(conn, _sql.PGMQ_SCHEMA_EXISTS):
        return ["pgmq is not installed"]
    if not await _scalar(conn, _sql.WAKEUP_FUNCTION_OK):
        problems.append("pg-worker's schema (pgworker.wake_waiting_workers) is missing")
    else:
        version = await _schema_version(conn)
        if version is not None and version > _sql.SCHEMA_VERSION:
            raise SetupError(_newer_schema(version))
        if version != _sql.SCHEMA_VERSION:
            problems.append(f"pg-worker's schema is version {version}, this pg-worker needs {_sql.SCHEMA_VERSION}")
    for queue in queues:
        for name in (queue, dlq_name(queue)):
            if not await _scalar(conn, _sql.QUEUE_EXISTS, (name,)):
                problems.append(f"queue {name!r} does not exist")
        if not await _scalar(conn, _sql.WAKEUP_TRIGGER_OK, {"table": _sql.qualified_queue_table(queue), "queue": queue}):
            problems.append(f"wakeup trigger on queue {queue!r} is missing or disabled")
    return problems
