"""Queue names and the identifiers derived from them.

pgmq 1.13.0 silently breaks notifications for names that are not all lowercase, and it builds table names
as ``q_<name>`` / ``a_<name>`` with a 47-character limit. We accept only names that are safe everywhere a
name ends up: table names, index names, NOTIFY channels and the ``<name>_dlq`` dead-letter queue.
"""

from __future__ import annotations

import re

DLQ_SUFFIX = "_dlq"
PGMQ_MAX_NAME = 47
MAX_QUEUE_NAME = PGMQ_MAX_NAME - len(DLQ_SUFFIX)

_QUEUE_NAME = re.compile(r"[a-z][a-z0-9_]*")


class InvalidQueueName(ValueError):
    """A queue name that pgmq or pg-worker cannot use safely."""


def validate_queue_name(name: str, *, allow_dlq: bool = False) -> str:
    """Return ``name`` unchanged if it is a usable queue name, else raise :class:`InvalidQueueName`.

    ``allow_dlq`` admits the longer ``<queue>_dlq`` names (used by the admin commands, not by handlers).
    """
    if not isinstance(name, str):
        raise InvalidQueueName(f"queue name must be a string, got {type(name).__name__}")
    limit = PGMQ_MAX_NAME if allow_dlq else MAX_QUEUE_NAME
    if not _QUEUE_NAME.fullmatch(name):
        raise InvalidQueueName(
            f"invalid queue name {name!r}: use lowercase letters, digits and '_', starting with a letter "
            "(pgmq 1.13.0 mishandles mixed case)"
        )
    if len(name) > limit:
        raise InvalidQueueName(
            f"invalid queue name {name!r}: at most {limit} characters "
            f"(pgmq allows {PGMQ_MAX_NAME}, and the dead-letter queue adds {DLQ_SUFFIX!r})"
        )
    if not allow_dlq and name.endswith(DLQ_SUFFIX):
        raise InvalidQueueName(f"invalid queue name {name!r}: the suffix {DLQ_SUFFIX!r} is reserved for dead-letter queues")
    return name


def dlq_name(queue: str) -> str:
    """The dead-letter queue that belongs to ``queue``."""
    return validate_queue_name(queue) + DLQ_SUFFIX


def source_of_dlq(dlq: str) -> str:
    """The queue that a dead-letter queue belongs to."""
    validate_queue_name(dlq, allow_dlq=True)
    if not dlq.endswith(DLQ_SUFFIX):
        raise InvalidQueueName(f"{dlq!r} is not a dead-letter queue (no {DLQ_SUFFIX!r} suffix)")
    return dlq[: -len(DLQ_SUFFIX)]


def notify_channel(queue: str) -> str:
    """The LISTEN/NOTIFY channel on which producers wake the workers of ``queue``."""
    return "pg_worker_" + validate_queue_name(queue)


def queue_table(queue: str) -> str:
    """pgmq's table for ``queue`` (unqualified; always used with the ``pgmq`` schema and quoted)."""
    return "q_" + validate_queue_name(queue, allow_dlq=True)


def archive_table(queue: str) -> str:
    return "a_" + validate_queue_name(queue, allow_dlq=True)
