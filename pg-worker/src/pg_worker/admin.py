"""What the admin commands do, as plain functions over a psycopg connection (the CLI only renders)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from . import _sql
from ._names import DLQ_SUFFIX, source_of_dlq, validate_queue_name


class AdminError(Exception):
    """A request that cannot be carried out (no such message): exit code 1 in the CLI."""


class UnknownQueue(AdminError):
    """The named queue does not exist (bad input: exit code 2 in the CLI); the message lists the known ones."""

    def __init__(self, queue: str, known: Sequence[str], what: str = "queue") -> None:
        listed = ", ".join(known) if known else "none (run `pg-worker install`)"
        super().__init__(f"no such {what} {queue!r}; known queues: {listed}")
        self.queue = queue
        self.known = list(known)


@dataclass(frozen=True)
class QueueStats:
    queue: str
    depth: int
    visible: int
    in_flight: int
    delayed: int
    oldest_age: float | None
    dlq_depth: int
    estimated: bool
    enqueued_total: int
    # of the messages read and not yet visible: in_flight are held by a worker now, retrying wait for their retry
    retrying: int = 0


@dataclass(frozen=True)
class DeadLetter:
    """A message of ``<queue>_dlq``. ``dlq_id`` is its id there (what show, replay and purge take);
    ``original_msg_id`` the id it had in its own queue, kept only for tracing logs."""

    dlq_id: int
    dead_since: datetime
    body: dict[str, Any]

    @property
    def error(self) -> dict[str, Any]:
        error = self.body.get("error")
        return error if isinstance(error, dict) else {}

    @property
    def original_msg_id(self) -> int | None:
        value = self.body.get("original_msg_id", self.body.get("msg_id"))
        return value if isinstance(value, int) else None

    def as_dict(self) -> dict[str, Any]:
        """The dead letter as one flat record, with both ids named unambiguously (the body's ``msg_id`` is
        the original one)."""
        rest = {k: v for k, v in self.body.items() if k not in ("msg_id", "original_msg_id", "dlq_id")}
        return {"dlq_id": self.dlq_id, "original_msg_id": self.original_msg_id, "dead_since": self.dead_since.isoformat(), **rest}


def _all_queues(conn: psycopg.Connection[Any]) -> list[str]:
    return [row[0] for row in conn.execute(_sql.LIST_QUEUES).fetchall()]


def list_queues(conn: psycopg.Connection[Any]) -> list[str]:
    """Every pgmq queue that is not a dead-letter queue."""
    return [name for name in _all_queues(conn) if not name.endswith(DLQ_SUFFIX)]


def fetch_queue_stats(conn: psycopg.Connection[Any], queues: Iterable[str] | None = None, *, exact_limit: int = _sql.EXACT_COUNT_LIMIT) -> list[QueueStats]:
    """Per-queue statistics in one statement. Counts are exact up to ``exact_limit`` rows, then the planner's
    estimate (``pg_class.reltuples``): no full scan of a queue with millions of rows."""
    # Given queues (a worker's own, installed with their DLQs) are known to exist: one statement. Otherwise
    # list what exists first: queues created by others may have no dead-letter queue.
    if queues is None:
        everything = _all_queues(conn)
        names = [name for name in everything if not name.endswith(DLQ_SUFFIX)]
        with_dlq = {name.removesuffix(DLQ_SUFFIX) for name in everything if name.endswith(DLQ_SUFFIX)}
    else:
        names = sorted(set(queues))
        with_dlq = set(names)
    if not names:
        return []
    return [QueueStats(*row) for row in conn.execute(_sql.queue_stats(names, with_dlq, exact_limit)).fetchall()]


def _exists(conn: psycopg.Connection[Any], queue: str) -> bool:
    row = conn.execute(_sql.QUEUE_EXISTS, (queue,)).fetchone()
    return bool(row and row[0])


def check_queue(conn: psycopg.Connection[Any], name: str) -> str:
    """``name`` if it is a queue; :class:`UnknownQueue` (listing the known ones) if not."""
    queue = validate_queue_name(name)
    if not _exists(conn, queue):
        raise UnknownQueue(queue, list_queues(conn))
    return queue


def resolve_dlq(conn: psycopg.Connection[Any], name: str) -> tuple[str, str]:
    """``(queue, dlq)`` for ``jobs`` or ``jobs_dlq``; :class:`UnknownQueue` if it does not exist."""
    queue = source_of_dlq(name) if name.endswith(DLQ_SUFFIX) else validate_queue_name(name)
    dlq = queue + DLQ_SUFFIX
    if not _exists(conn, dlq):
        raise UnknownQueue(dlq, [q for q in list_queues(conn) if _exists(conn, q + DLQ_SUFFIX)], what="dead-letter queue")
    return queue, dlq


def dlq_list(conn: psycopg.Connection[Any], name: str, *, limit: int = 50) -> list[DeadLetter]:
    _, dlq = resolve_dlq(conn, name)
    return [DeadLetter(*row) for row in conn.execute(_sql.dlq_list(dlq), (limit,)).fetchall()]


def dlq_show(conn: psycopg.Connection[Any], name: str, dlq_id: int) -> DeadLetter:
    _, dlq = resolve_dlq(conn, name)
    row = conn.execute(_sql.dlq_show(dlq), (dlq_id,)).fetchone()
    if row is None:
        raise AdminError(f"no dead letter with dlq_id {dlq_id} in {dlq}")
    return DeadLetter(*row)


def _ids_or_all(ids: Sequence[int], every: bool) -> None:
    if every and ids:
        raise ValueError("give dlq_ids or --all, not both")
    if not every and not ids:
        raise ValueError("give one or more dlq_ids, or --all")


def _all_found(ids: Sequence[int], found: Sequence[int], dlq: str) -> None:
    """All or nothing: raising inside the transaction rolls back what the statement did."""
    missing = sorted(set(ids) - set(found))
    if missing:
        raise AdminError(f"no such dlq_id in {dlq}: {', '.join(map(str, missing))}; nothing changed")


def dlq_replay(conn: psycopg.Connection[Any], name: str, ids: Sequence[int] = (), *, every: bool = False) -> list[tuple[int, int]]:
    """Send dead letters back to their queue as new messages (attempts start at 0); ``(dlq_id, new msg_id)`` pairs.

    Atomic: the delete from the DLQ and the sends happen in one statement.
    """
    _ids_or_all(ids, every)
    queue, dlq = resolve_dlq(conn, name)
    with conn.transaction():
        rows = conn.execute(_sql.dlq_replay(dlq, every=every), {"ids": list(ids), "queue": queue}).fetchall()
        _all_found(ids, [row[0] for row in rows], dlq)
    return [(row[0], row[1]) for row in rows]


def dlq_purge(conn: psycopg.Connection[Any], name: str, ids: Sequence[int] = (), *, every: bool = False) -> list[int]:
    _ids_or_all(ids, every)
    _, dlq = resolve_dlq(conn, name)
    with conn.transaction():
        deleted = [row[0] for row in conn.execute(_sql.dlq_purge(dlq, every=every), {"ids": list(ids)}).fetchall()]
        _all_found(ids, deleted, dlq)
    return deleted
