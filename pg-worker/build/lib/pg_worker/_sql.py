"""Every SQL statement pg-worker runs, in one place.

Queue names reach SQL in two ways only: as bound parameters, or as identifiers built with
:mod:`psycopg.sql` after :func:`pg_worker._names.validate_queue_name` accepted them. Nothing here is
assembled from free text.
"""

from __future__ import annotations

from psycopg import sql

from ._names import notify_channel, queue_table, validate_queue_name

SCHEMA_VERSION = 1
MIN_PGMQ_VERSION = (1, 10, 0)

# --- installation ----------------------------------------------------------------------------------------

# One global lock serialises concurrent installs (two migrations started at once); it is released at commit.
INSTALL_LOCK = "SELECT pg_advisory_xact_lock(hashtext('pgworker.install'))"

PGMQ_EXTENSION_VERSION = "SELECT extversion FROM pg_extension WHERE extname = 'pgmq'"
PGMQ_AVAILABLE_VERSION = "SELECT default_version FROM pg_available_extensions WHERE name = 'pgmq'"
PGMQ_SCHEMA_EXISTS = "SELECT to_regnamespace('pgmq') IS NOT NULL"
CREATE_PGMQ_EXTENSION = "CREATE EXTENSION IF NOT EXISTS pgmq"

# pgmq 1.10 added last_read_at to message_record; the pgmq client (and so pg-worker) reads it.
PGMQ_HAS_LAST_READ_AT = """
SELECT EXISTS (
    SELECT 1
    FROM pg_type t
    JOIN pg_namespace n ON n.oid = t.typnamespace
    JOIN pg_attribute a ON a.attrelid = t.typrelid
    WHERE n.nspname = 'pgmq' AND t.typname = 'message_record'
      AND a.attname = 'last_read_at' AND NOT a.attisdropped
)
"""

SCHEMA_DDL = """
CREATE SCHEMA IF NOT EXISTS pgworker;

CREATE TABLE IF NOT EXISTS pgworker.meta (
    key text PRIMARY KEY,
    value text NOT NULL
);

-- One row per (queue, worker) while that worker is idle and listening. Producers read it without locks;
-- only the worker that owns a row writes it, so producers never wait on each other here.
CREATE TABLE IF NOT EXISTS pgworker.waiters (
    queue_name text NOT NULL,
    worker_id text NOT NULL,
    listener_pid integer NOT NULL,
    marked_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (queue_name, worker_id)
);

CREATE OR REPLACE FUNCTION pgworker.wake_waiting_workers() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    -- Statement-level: a send_batch of any size costs one check and at most one notification.
    -- Busy workers have no row, so under load producers skip pg_notify and its commit-time lock.
    IF EXISTS (SELECT 1 FROM pgworker.waiters WHERE queue_name = TG_ARGV[0]) THEN
        PERFORM pg_notify('pg_worker_' || TG_ARGV[0], '');
    END IF;
    RETURN NULL;
END;
$fn$;

GRANT USAGE ON SCHEMA pgworker TO PUBLIC;
GRANT SELECT ON pgworker.waiters TO PUBLIC;
"""

SET_META = """
INSERT INTO pgworker.meta (key, value) VALUES (%s, %s)
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
"""
GET_META = "SELECT value FROM pgworker.meta WHERE key = %s"

CREATE_QUEUE = "SELECT pgmq.create(%s)"
QUEUE_EXISTS = "SELECT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = %s)"

# Whether the wakeup trigger is in place, enabled and calls our function with the right argument.
WAKEUP_TRIGGER_OK = """
SELECT EXISTS (
    SELECT 1
    FROM pg_trigger tg
    JOIN pg_proc p ON p.oid = tg.tgfoid
    JOIN pg_namespace pn ON pn.oid = p.pronamespace
    WHERE tg.tgrelid = to_regclass(%(table)s)
      AND tg.tgname = 'pg_worker_wakeup'
      AND tg.tgenabled <> 'D'
      AND pn.nspname = 'pgworker' AND p.proname = 'wake_waiting_workers'
      AND tg.tgnargs = 1
      AND encode(tg.tgargs, 'escape') = %(queue)s || '\\000'
)
"""

WAKEUP_FUNCTION_OK = "SELECT to_regprocedure('pgworker.wake_waiting_workers()') IS NOT NULL"


def create_wakeup_trigger(queue: str) -> sql.Composed:
    return sql.SQL(
        "CREATE OR REPLACE TRIGGER pg_worker_wakeup AFTER INSERT ON pgmq.{table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION pgworker.wake_waiting_workers({queue})"
    ).format(table=sql.Identifier(queue_table(queue)), queue=sql.Literal(validate_queue_name(queue)))


def qualified_queue_table(queue: str) -> str:
    """``pgmq.q_<queue>`` as text, for ``to_regclass``."""
    return f"pgmq.{queue_table(queue)}"


# --- consuming -------------------------------------------------------------------------------------------

def read(queue: str, *, unmark: bool) -> sql.Composed:
    """Lease up to ``qty`` visible messages, and in the same statement delete the ones this worker finished.

    The same query as ``pgmq.read`` (oldest first, ``FOR UPDATE SKIP LOCKED``, ``read_ct + 1``), written against
    the queue table so that it is a prepared statement rather than plpgsql building SQL text on every call; the
    piggybacked acknowledgements save a statement and a commit per batch. ``unmark`` also withdraws this
    worker's waiting mark: the first read after a wakeup, so producers stop notifying while it is busy.
    """
    unmark_cte = (
        sql.SQL("unmark AS (DELETE FROM pgworker.waiters WHERE queue_name = %(queue)s AND worker_id = %(worker)s), ")
        if unmark
        else sql.SQL("")
    )
    return sql.SQL(
        """
        WITH {unmark_cte}
        acked AS (DELETE FROM pgmq.{t} WHERE msg_id = ANY(%(acks)s::bigint[])),
        leased AS (
            SELECT msg_id FROM pgmq.{t}
            WHERE vt <= clock_timestamp()
            ORDER BY msg_id
            LIMIT %(qty)s
            FOR UPDATE SKIP LOCKED
        )
        UPDATE pgmq.{t} m
        SET last_read_at = clock_timestamp(),
            vt = clock_timestamp() + make_interval(secs => %(vt)s),
            read_ct = m.read_ct + 1
        FROM leased
        WHERE m.msg_id = leased.msg_id
        RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.message, m.headers
        """
    ).format(unmark_cte=unmark_cte, t=sql.Identifier(queue_table(queue)))


MARK_WAITING = """
INSERT INTO pgworker.waiters (queue_name, worker_id, listener_pid) VALUES (%(queue)s, %(worker)s, %(pid)s)
ON CONFLICT (queue_name, worker_id)
DO UPDATE SET listener_pid = EXCLUDED.listener_pid, marked_at = clock_timestamp()
"""

UNMARK_WORKER = "DELETE FROM pgworker.waiters WHERE worker_id = %s"

# Marks whose listener connection no longer exists belong to dead workers; they only cost notifications.
DELETE_STALE_MARKS = """
DELETE FROM pgworker.waiters
WHERE listener_pid NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)
"""


def sleep_check(queue: str) -> sql.Composed:
    """Run after the waiting mark is committed: which writers might have missed it, and when is work due.

    ``in_flight`` lists the transactions still running in this snapshot. Any producer that checked for a
    waiting mark before ours was committed is among them or had committed already (and so is visible to the
    ``next_vt`` look-up). Producers that start later see the mark and notify.
    """
    return sql.SQL(
        """
        SELECT ARRAY(SELECT pg_snapshot_xip(pg_current_snapshot())::text) AS in_flight,
               (SELECT min(vt) FROM pgmq.{table}) AS next_vt,
               clock_timestamp() AS now
        """
    ).format(table=sql.Identifier(queue_table(queue)))


def recheck(queue: str) -> sql.Composed:
    """Which of the remembered transactions are still running, and when is work due."""
    return sql.SQL(
        """
        SELECT ARRAY(
                   SELECT x FROM unnest(%(xids)s::text[]) AS x
                   WHERE pg_xact_status(x::xid8) = 'in progress'
               ) AS in_flight,
               (SELECT min(vt) FROM pgmq.{table}) AS next_vt,
               clock_timestamp() AS now
        """
    ).format(table=sql.Identifier(queue_table(queue)))


def poll_check(queues: list[str]) -> sql.Composed:
    """The fallback poll: when work is due on each queue, in one statement (one transaction) for all of them."""
    branches = [
        sql.SQL("SELECT {name}::text, (SELECT min(vt) FROM pgmq.{table}), clock_timestamp()").format(
            name=sql.Literal(validate_queue_name(q)), table=sql.Identifier(queue_table(q))
        )
        for q in queues
    ]
    return sql.SQL(" UNION ALL ").join(branches)


def delete_many(queue: str) -> sql.Composed:
    return sql.SQL("DELETE FROM pgmq.{t} WHERE msg_id = ANY(%s::bigint[])").format(t=sql.Identifier(queue_table(queue)))


def archive_many(queue: str) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM pgmq.archive({q}, %s::bigint[])").format(q=sql.Literal(validate_queue_name(queue)))

RETRY_LATER = """
SELECT count(*) FROM pgmq.set_vt(%(queue)s, %(msg_id)s::bigint, clock_timestamp() + make_interval(secs => %(delay)s))
"""

EXTEND_LEASES = """
SELECT msg_id FROM pgmq.set_vt(%(queue)s, %(ids)s::bigint[], clock_timestamp() + make_interval(secs => %(vt)s))
"""


def hand_back(queue: str) -> sql.Composed:
    """Make interrupted messages visible at once, and give back the delivery that shutdown cut short."""
    return sql.SQL(
        "UPDATE pgmq.{table} SET vt = clock_timestamp(), read_ct = greatest(read_ct - 1, 0) "
        "WHERE msg_id = ANY(%s::bigint[])"
    ).format(table=sql.Identifier(queue_table(queue)))


def dead_letter(queue: str) -> sql.Composed:
    """Move one message to the dead-letter queue in a single statement (so in one transaction).

    The DLQ copy is built from the row as it is deleted, so nothing is sent if the message is gone already.
    """
    return sql.SQL(
        """
        WITH moved AS (
            DELETE FROM pgmq.{table} WHERE msg_id = %(msg_id)s
            RETURNING msg_id, read_ct, enqueued_at, message, headers
        )
        SELECT pgmq.send(
            %(dlq)s,
            jsonb_build_object(
                'queue', %(queue)s::text,
                'msg_id', moved.msg_id,
                'message', moved.message,
                'headers', moved.headers,
                'attempts', moved.read_ct,
                'enqueued_at', moved.enqueued_at,
                'failed_at', clock_timestamp(),
                'error', %(error)s::jsonb
            )
        )
        FROM moved
        """
    ).format(table=sql.Identifier(queue_table(queue)))


# --- producing -------------------------------------------------------------------------------------------

SEND = """
SELECT pgmq.send(%(queue)s, %(message)s::jsonb, %(headers)s::jsonb,
                 clock_timestamp() + make_interval(secs => %(delay)s))
"""

SEND_BATCH = """
SELECT pgmq.send_batch(%(queue)s, %(messages)s::jsonb[], %(headers)s::jsonb[],
                       clock_timestamp() + make_interval(secs => %(delay)s))
"""


# --- statistics and administration ----------------------------------------------------------------------

EXACT_COUNT_LIMIT = 100_000

LIST_QUEUES = "SELECT queue_name FROM pgmq.meta ORDER BY queue_name"


def _capped_count(table: sql.Identifier, where: str, limit: int) -> sql.Composed:
    return sql.SQL("(SELECT count(*) FROM (SELECT 1 FROM pgmq.{t} WHERE " + where + " LIMIT {n}) AS capped)").format(
        t=table, n=sql.Literal(limit)
    )


def queue_stats(queues: list[str], with_dlq: set[str], limit: int = EXACT_COUNT_LIMIT) -> sql.Composed:
    """Depth, visible, in flight, delayed, oldest age, DLQ depth, estimated?, messages ever sent: per queue.

    Counts stop at ``limit`` rows (the vt index bounds the work); past it the depth is the planner's estimate.
    Only queues in ``with_dlq`` have their dead-letter queue counted (a table that does not exist cannot even
    appear in the statement).
    """
    branches = []
    for queue in queues:
        table = sql.Identifier(queue_table(queue))
        dlq = sql.Identifier(queue_table(queue + "_dlq"))
        regclass = sql.Literal(f"pgmq.{queue_table(queue)}")
        dlq_regclass = sql.Literal(f"pgmq.{queue_table(queue + '_dlq')}")
        dlq_depth = _capped_count(dlq, "true", limit) if queue in with_dlq else sql.SQL("0")
        branches.append(
            sql.SQL(
                """
                SELECT {name}::text,
                       CASE WHEN c.reltuples > {limit} THEN c.reltuples::bigint ELSE {depth} END,
                       {visible}, {in_flight}, {delayed},
                       extract(epoch FROM clock_timestamp() - (SELECT enqueued_at FROM pgmq.{t} ORDER BY msg_id LIMIT 1))::float8,
                       CASE WHEN to_regclass({dlq_reg}) IS NULL THEN 0
                            WHEN dc.reltuples > {limit} THEN dc.reltuples::bigint ELSE {dlq_depth} END,
                       c.reltuples > {limit},
                       coalesce(pg_sequence_last_value(pg_get_serial_sequence({reg}, 'msg_id')::regclass), 0)
                FROM pg_class c LEFT JOIN pg_class dc ON dc.oid = to_regclass({dlq_reg})
                WHERE c.oid = {reg}::regclass
                """
            ).format(
                name=sql.Literal(validate_queue_name(queue)),
                limit=sql.Literal(limit),
                t=table,
                reg=regclass,
                dlq_reg=dlq_regclass,
                depth=_capped_count(table, "true", limit),
                visible=_capped_count(table, "vt <= clock_timestamp()", limit),
                in_flight=_capped_count(table, "vt > clock_timestamp() AND read_ct > 0", limit),
                delayed=_capped_count(table, "vt > clock_timestamp() AND read_ct = 0", limit),
                dlq_depth=dlq_depth,
            )
        )
    return sql.SQL(" UNION ALL ").join(branches)


def dlq_list(dlq: str) -> sql.Composed:
    return sql.SQL("SELECT msg_id, enqueued_at, message FROM pgmq.{t} ORDER BY msg_id LIMIT %s").format(
        t=sql.Identifier(queue_table(dlq))
    )


def dlq_show(dlq: str) -> sql.Composed:
    return sql.SQL("SELECT msg_id, enqueued_at, message FROM pgmq.{t} WHERE msg_id = %s").format(
        t=sql.Identifier(queue_table(dlq))
    )


def dlq_replay(dlq: str, *, every: bool) -> sql.Composed:
    """Send dead letters back to their source queue as new messages (attempts start again), in one statement."""
    where = sql.SQL("true") if every else sql.SQL("msg_id = ANY(%(ids)s::bigint[])")
    return sql.SQL(
        """
        WITH moved AS (DELETE FROM pgmq.{t} WHERE {where} RETURNING msg_id, message)
        SELECT moved.msg_id, pgmq.send(%(queue)s, moved.message->'message', nullif(moved.message->'headers', 'null'::jsonb))
        FROM moved ORDER BY moved.msg_id
        """
    ).format(t=sql.Identifier(queue_table(dlq)), where=where)


def dlq_purge(dlq: str, *, every: bool) -> sql.Composed:
    where = sql.SQL("true") if every else sql.SQL("msg_id = ANY(%(ids)s::bigint[])")
    return sql.SQL("DELETE FROM pgmq.{t} WHERE {where} RETURNING msg_id").format(
        t=sql.Identifier(queue_table(dlq)), where=where
    )


def channel_listen(queue: str) -> sql.Composed:
    return sql.SQL("LISTEN {}").format(sql.Identifier(notify_channel(queue)))
