"""Every SQL statement pg-worker runs, in one place.

Queue names reach SQL in two ways only: as bound parameters, or as identifiers built with
:mod:`psycopg.sql` after :func:`pg_worker._names.validate_queue_name` accepted them. Nothing here is
assembled from free text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from psycopg import sql

from ._names import archive_table, notify_channel, queue_table, validate_queue_name

# 2: the wakeup trigger notifies for every REPEATABLE READ / SERIALIZABLE producer.
SCHEMA_VERSION = 2
MIN_PGMQ_VERSION = (1, 10, 0)


def compiled(query: sql.Composed) -> bytes:
    """A statement rendered once to the bytes psycopg sends: a ``Composed`` is otherwise rendered again (every
    identifier quoted and encoded) on each execution, which showed in the drain profile. Identifiers here are
    validated ASCII names, so the rendering does not depend on the connection's encoding."""
    return query.as_bytes(None)


def int_array(values: Iterable[int]) -> str:
    """Integers as an array literal for ``%(x)s::bigint[]`` / ``::int[]``: psycopg's list adaptation looks up
    a dumper per element, and the ids and read_cts of every batch go through here (reads, acks, renewals)."""
    return "{" + ",".join(map(str, values)) + "}"


@functools.lru_cache(maxsize=256)
def per_queue(builder: Callable[..., sql.Composed], queue: str, **options: bool) -> bytes:
    """``builder(queue, **options)`` compiled once per queue and options (statements run per job or per renewal)."""
    return compiled(builder(queue, **options))


# --- installation ----------------------------------------------------------------------------------------

# One global lock serialises concurrent installs (two migrations started at once); it is released at commit.
INSTALL_LOCK = "SELECT pg_advisory_xact_lock(hashtext('pgworker.install'))"
SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %s, true)"

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
    -- A REPEATABLE READ or SERIALIZABLE producer reads the marks in a snapshot that may predate a worker's
    -- mark, and the worker's race check cannot see a producer that had no xid yet when it marked: such
    -- producers always notify.
    IF current_setting('transaction_isolation') <> 'read committed'
       OR EXISTS (SELECT 1 FROM pgworker.waiters WHERE queue_name = TG_ARGV[0]) THEN
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


def grant_worker(role: str, queue: str) -> sql.Composed:
    """What a worker role that owns nothing needs: read and write the queue, its archive and its DLQ (pgmq's
    functions run with the caller's rights), send to the DLQ, and keep its waiting marks."""
    tables = [sql.Identifier(name) for q in (queue, queue + "_dlq") for name in (queue_table(q), archive_table(q))]
    grantee = sql.Identifier(role)
    statements = [
        sql.SQL("GRANT USAGE ON SCHEMA pgmq, pgworker TO {r}").format(r=grantee),
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {r}").format(
            tables=sql.SQL(", ").join(sql.SQL("pgmq.{}").format(t) for t in tables), r=grantee
        ),
        sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA pgmq TO {r}").format(r=grantee),
        sql.SQL("GRANT SELECT ON pgmq.meta, pgworker.meta TO {r}").format(r=grantee),
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON pgworker.waiters TO {r}").format(r=grantee),
    ]
    return sql.SQL("; ").join(statements)


def create_wakeup_trigger(queue: str) -> sql.Composed:
    return sql.SQL(
        "CREATE OR REPLACE TRIGGER pg_worker_wakeup AFTER INSERT ON pgmq.{table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION pgworker.wake_waiting_workers({queue})"
    ).format(table=sql.Identifier(queue_table(queue)), queue=sql.Literal(validate_queue_name(queue)))


def qualified_queue_table(queue: str) -> str:
    """``pgmq.q_<queue>`` as text, for ``to_regclass``."""
    return f"pgmq.{queue_table(queue)}"


# --- consuming -------------------------------------------------------------------------------------------
#
# Every write about a held message is fenced by the delivery it holds: ``msg_id`` AND the ``read_ct`` that the
# read returned. A worker whose lease ran out (and whose message another worker read since, so read_ct grew)
# matches no row: its late acknowledgement, retry, dead-letter move, hand-back or renewal changes nothing, and
# the ``RETURNING`` tells it the lease was lost. read_ct only ever grows (hand-backs no longer give it back;
# they are counted in a header instead), so a delivery's (msg_id, read_ct) is never reused.

# Headers pg-worker keeps on a message for itself (never shown to handlers):
CLOSED_KEY = "x-pg-worker-closed"  # read_ct of the last delivery that ended with a recorded retry or hand-back
HANDBACKS_KEY = "x-pg-worker-handbacks"  # deliveries that are not attempts: given back at shutdown, or deferred
SOLO_KEY = "x-pg-worker-solo"  # times the message started as the only suspect running (its worker had died under it)
# Headers that are not a JSON object (pgmq takes any JSON: null, an array, a string) are kept under this key
# once pg-worker must record something on the message; handlers and the dead-letter queue see them as sent.
ORIGINAL_KEY = "x-pg-worker-headers"
INTERNAL_HEADERS = (CLOSED_KEY, HANDBACKS_KEY, SOLO_KEY, ORIGINAL_KEY)
# read_ct is an int4: a message read this often cannot be read again (the increment would overflow and fail the
# whole read of its queue). The read leaves it there, and the worker dead-letters it without running it.
MAX_READ_CT = 2147483647

_HELD = "unnest(%(ids)s::bigint[], %(cts)s::int[]) AS held(id, ct)"
_MATCH_HELD = "m.msg_id = held.id AND m.read_ct = held.ct"


def _merge_headers(pairs: str) -> str:
    """``m.headers`` with pg-worker's own keys merged in; headers that are not a JSON object are kept whole
    under ``ORIGINAL_KEY`` (else nothing could be recorded on them, and a poison message would never be caught)."""
    return (
        "CASE WHEN m.headers IS NULL THEN jsonb_build_object(" + pairs + ") "
        "WHEN jsonb_typeof(m.headers) = 'object' THEN m.headers || jsonb_build_object(" + pairs + ") "
        f"ELSE jsonb_build_object('{ORIGINAL_KEY}', m.headers) || jsonb_build_object(" + pairs + ") END"
    )


# The headers as the producer sent them: pg-worker's keys removed, non-object headers unwrapped.
_PUBLIC_HEADERS = (
    f"CASE WHEN jsonb_typeof(m.headers) <> 'object' THEN m.headers WHEN m.headers ? '{ORIGINAL_KEY}' "
    f"THEN m.headers->'{ORIGINAL_KEY}' ELSE m.headers - ARRAY[" + ", ".join(f"'{key}'" for key in INTERNAL_HEADERS) + "] END"
)


def read(queue: str, *, unmark: bool) -> sql.Composed:
    """Lease up to ``qty`` visible messages, and in the same statement delete the ones this worker finished.

    The same query as ``pgmq.read`` (oldest first, ``FOR UPDATE SKIP LOCKED``, ``read_ct + 1``), written against
    the queue table so that it is a prepared statement rather than plpgsql building SQL text on every call; the
    piggybacked acknowledgements (fenced by read_ct) save a statement and a commit per batch. Rows with a NULL
    read_ct confirm an acknowledgement. ``unmark`` also withdraws this worker's waiting mark: the first read
    after a wakeup, so producers stop notifying while it is busy.
    """
    unmark_cte = (
        sql.SQL("unmark AS (DELETE FROM pgworker.waiters WHERE queue_name = %(queue)s AND worker_id = %(worker)s), ")
        if unmark
        else sql.SQL("")
    )
    return sql.SQL(
        """
        WITH {unmark_cte}
        acked AS (
            DELETE FROM pgmq.{t} m USING """ + _HELD + """
            WHERE """ + _MATCH_HELD + """
            RETURNING m.msg_id
        ),
        leased AS (
            SELECT msg_id FROM pgmq.{t}
            WHERE vt <= clock_timestamp() AND msg_id <> ALL(%(ids)s::bigint[])
            ORDER BY msg_id
            LIMIT %(qty)s
            FOR UPDATE SKIP LOCKED
        ),
        taken AS (
            UPDATE pgmq.{t} m
            SET last_read_at = clock_timestamp(),
                vt = clock_timestamp() + make_interval(secs => %(vt)s),
                read_ct = CASE WHEN m.read_ct < """ + str(MAX_READ_CT) + """ THEN m.read_ct + 1 ELSE m.read_ct END
            FROM leased
            WHERE m.msg_id = leased.msg_id
            RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.message, m.headers
        )
        SELECT msg_id, read_ct, enqueued_at, message, headers FROM taken
        UNION ALL
        SELECT msg_id, NULL, NULL, NULL, NULL FROM acked
        """
    ).format(unmark_cte=unmark_cte, t=sql.Identifier(queue_table(queue)))


MARK_WAITING = """
INSERT INTO pgworker.waiters (queue_name, worker_id, listener_pid) VALUES (%(queue)s, %(worker)s, %(pid)s)
ON CONFLICT (queue_name, worker_id)
DO UPDATE SET listener_pid = EXCLUDED.listener_pid, marked_at = clock_timestamp()
"""

UNMARK_WORKER = "DELETE FROM pgworker.waiters WHERE worker_id = %s"

# Held by the LISTEN connection (released when it closes): one live worker per worker id.
CLAIM_WORKER_ID = "SELECT pg_try_advisory_lock(hashtext('pgworker.worker_id'), hashtext(%s))"

# Marks whose listener connection no longer exists belong to dead workers; they only cost notifications.
DELETE_STALE_MARKS = """
DELETE FROM pgworker.waiters
WHERE listener_pid NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)
"""

# Transactions of other databases of the cluster cannot insert into our queues: leave them out of the
# racing producers (a transaction that ended meanwhile is kept, which only costs one more re-check).
_OTHER_DATABASES_XIDS = """
    SELECT backend_xid::text::bigint FROM pg_stat_activity
    WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database()
"""

# When work is next due, leaving out messages other workers hold right now: their holders renew the lease at
# half its length, and an idle worker that planned on those vts would wake at every renewal. Held messages
# are reported apart (the earliest one's id and vt), so that a crashed holder's message is still picked up
# when its lease ends, with a backoff while the same message keeps being renewed. A huge vt (a delay of
# centuries typed by mistake) is clamped, so it cannot break the plan.
_HELD_NOW = f"(read_ct > 0 AND vt > clock_timestamp() AND (headers->>'{CLOSED_KEY}') IS DISTINCT FROM read_ct::text)"
_NEXT_VT = (
    "(SELECT least(vt, clock_timestamp() + interval '100 years') FROM pgmq.{table} WHERE NOT " + _HELD_NOW
    + " ORDER BY vt LIMIT 1)"
)
_NEXT_HELD = (
    "(SELECT ARRAY[msg_id::float8, extract(epoch FROM least(vt, clock_timestamp() + interval '100 years') - clock_timestamp())::float8]"
    " FROM pgmq.{table} WHERE "
    + _HELD_NOW + " ORDER BY vt LIMIT 1)"
)


def _sleep_plan(queue: str, in_flight: str) -> sql.Composed:
    """Racing producers (``in_flight``, a subquery) and when work is next due, all in one statement snapshot."""
    return sql.SQL(
        "SELECT ARRAY(" + in_flight + ") AS in_flight, " + _NEXT_VT + " AS next_vt, clock_timestamp() AS now, "
        + _NEXT_HELD + " AS next_held"
    ).format(table=sql.Identifier(queue_table(queue)))


def sleep_check(queue: str) -> sql.Composed:
    """Run after the waiting mark is committed: which writers might have missed it, and when is work due.

    ``in_flight`` lists the transactions still running in this statement's snapshot, the same snapshot in
    which ``next_vt`` is read. Any producer that checked for a waiting mark before ours was committed is among
    them or had committed already (and so is visible to ``next_vt``). Producers that start later see the mark
    and notify (REPEATABLE READ and SERIALIZABLE producers always notify: their snapshot may predate the mark).
    """
    return _sleep_plan(
        queue,
        "SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) AS x "
        "WHERE mod(x::text::bigint, 4294967296) NOT IN (" + _OTHER_DATABASES_XIDS + ")",
    )


def recheck(queue: str) -> sql.Composed:
    """Which of the remembered transactions are still running, and when is work due: both judged by the
    statement's own snapshot (a live status check could see a commit whose row the snapshot misses)."""
    return _sleep_plan(
        queue, "SELECT x FROM unnest(%(xids)s::text[]) AS x WHERE NOT pg_visible_in_snapshot(x::xid8, pg_current_snapshot())"
    )


def poll_check(queues: list[str]) -> sql.Composed:
    """The fallback poll: when work is due on each queue, in one statement (one transaction) for all of them."""
    branches = [
        sql.SQL("SELECT {name}::text, " + _NEXT_VT + ", clock_timestamp()").format(
            name=sql.Literal(validate_queue_name(q)), table=sql.Identifier(queue_table(q))
        )
        for q in queues
    ]
    return sql.SQL(" UNION ALL ").join(branches)


def delete_held(queue: str) -> sql.Composed:
    """Acknowledge by deleting; returns the ids whose delivery still matched."""
    return sql.SQL("DELETE FROM pgmq.{t} m USING " + _HELD + " WHERE " + _MATCH_HELD + " RETURNING m.msg_id").format(
        t=sql.Identifier(queue_table(queue))
    )


def archive_held(queue: str) -> sql.Composed:
    """Acknowledge by moving to pgmq's archive table (what ``pgmq.archive`` does, fenced)."""
    return sql.SQL(
        """
        WITH moved AS (
            DELETE FROM pgmq.{t} m USING """ + _HELD + """
            WHERE """ + _MATCH_HELD + """
            RETURNING m.msg_id, m.vt, m.read_ct, m.enqueued_at, m.last_read_at, m.message, m.headers
        )
        INSERT INTO pgmq.{a} (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
        SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers FROM moved
        RETURNING msg_id
        """
    ).format(t=sql.Identifier(queue_table(queue)), a=sql.Identifier(archive_table(queue)))


def extend_leases(queue: str) -> sql.Composed:
    """Renew the visibility timeout of held messages; returns the ids whose lease was still ours.

    A delivery closed meanwhile (a retry or hand-back recorded while this statement waited for the row) is left
    alone: renewing it would overwrite the retry's delay."""
    return sql.SQL(
        "UPDATE pgmq.{t} m SET vt = clock_timestamp() + make_interval(secs => %(vt)s) FROM " + _HELD
        + " WHERE " + _MATCH_HELD + f" AND (m.headers->>'{CLOSED_KEY}') IS DISTINCT FROM m.read_ct::text RETURNING m.msg_id"
    ).format(t=sql.Identifier(queue_table(queue)))


def retry_later(queue: str, *, count_attempt: bool = True) -> sql.Composed:
    """Make a held message visible again after ``delay`` seconds, recording that this delivery ended cleanly.

    Without ``count_attempt`` (a deferral) the delivery is also counted with the hand-backs, so that it is not
    an attempt: ``Job.attempt`` and the ``max_attempts`` limit leave it out.
    """
    closed = f"'{CLOSED_KEY}', m.read_ct"
    if not count_attempt:
        closed += f", '{HANDBACKS_KEY}', coalesce((m.headers->>'{HANDBACKS_KEY}')::int, 0) + 1"
    return sql.SQL(
        "UPDATE pgmq.{t} m SET vt = clock_timestamp() + make_interval(secs => %(delay)s), headers = "
        + _merge_headers(closed)
        + " WHERE m.msg_id = %(msg_id)s AND m.read_ct = %(read_ct)s RETURNING m.msg_id"
    ).format(t=sql.Identifier(queue_table(queue)))


def hand_back(queue: str, *, keep_vt: bool = False) -> sql.Composed:
    """Make interrupted messages visible at once; the delivery that shutdown cut short is not an attempt.

    ``keep_vt``: for a sync job whose thread shutdown had to abandon (it may still run, so its message stays
    leased until the visibility timeout): only record that the delivery ended in a graceful shutdown, so its
    next delivery is neither a poison suspect nor an attempt.
    """
    handbacks = f"coalesce((m.headers->>'{HANDBACKS_KEY}')::int, 0) + 1"
    return sql.SQL(
        "UPDATE pgmq.{t} m SET " + ("" if keep_vt else "vt = clock_timestamp(), ") + "headers = "
        + _merge_headers(f"'{CLOSED_KEY}', m.read_ct, '{HANDBACKS_KEY}', {handbacks}")
        + " FROM " + _HELD + " WHERE " + _MATCH_HELD + " RETURNING m.msg_id"
    ).format(t=sql.Identifier(queue_table(queue)))


def mark_solo(queue: str) -> sql.Composed:
    """Record, before it runs, that a message suspected of killing a worker starts in the suspect lane."""
    solo = f"coalesce((m.headers->>'{SOLO_KEY}')::int, 0) + 1"
    return sql.SQL(
        "UPDATE pgmq.{t} m SET headers = " + _merge_headers(f"'{SOLO_KEY}', {solo}")
        + " WHERE m.msg_id = %(msg_id)s AND m.read_ct = %(read_ct)s RETURNING m.msg_id"
    ).format(t=sql.Identifier(queue_table(queue)))


def dead_letter(queue: str) -> sql.Composed:
    """Move one held message to the dead-letter queue in a single statement (so in one transaction).

    The DLQ copy is built from the row as it is deleted, so nothing is sent if the delivery is not ours any
    more. ``attempts`` leaves out deliveries handed back at shutdown; pg-worker's own headers are dropped.
    """
    return sql.SQL(
        """
        WITH moved AS (
            DELETE FROM pgmq.{table} m WHERE m.msg_id = %(msg_id)s AND m.read_ct = %(read_ct)s
            RETURNING m.msg_id, m.read_ct - coalesce((m.headers->>'"""
        + HANDBACKS_KEY
        + """')::int, 0) AS attempts, m.enqueued_at, m.message, """
        + _PUBLIC_HEADERS
        + """ AS headers
        )
        SELECT pgmq.send(
            %(dlq)s,
            jsonb_build_object(
                'queue', %(queue)s::text,
                'msg_id', moved.msg_id,
                'message', moved.message,
                'headers', moved.headers,
                'attempts', moved.attempts,
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


def existing_queue_table(queue: str) -> str:
    """pgmq's table for a queue that already exists, whatever its name (``pgmq.format_table_name``)."""
    if '"' in queue or "\x00" in queue:
        raise ValueError(f"unexpected character in queue name {queue!r}")
    return f"q_{queue}".lower()


def queue_stats(queues: list[str], with_dlq: set[str], limit: int = EXACT_COUNT_LIMIT) -> sql.Composed:
    """Depth, visible, in flight, delayed, oldest age, DLQ depth, estimated?, messages ever sent: per queue.

    Counts stop at ``limit`` rows (the vt index bounds the work); past it the depth is the planner's estimate.
    Only queues in ``with_dlq`` have their dead-letter queue counted (a table that does not exist cannot even
    appear in the statement).
    """
    branches = []
    for queue in queues:
        # Any name pgmq holds (queues made by others may be mixed case or long): pgmq's own table naming,
        # always quoted as an identifier or bound as a literal, never spliced in as text.
        table = sql.Identifier(existing_queue_table(queue))
        dlq = sql.Identifier(existing_queue_table(queue + "_dlq"))
        regclass = sql.Literal(f'pgmq."{existing_queue_table(queue)}"')
        dlq_regclass = sql.Literal(f'pgmq."{existing_queue_table(queue + "_dlq")}"')
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
                       coalesce(pg_sequence_last_value(pg_get_serial_sequence({reg}, 'msg_id')::regclass), 0),
                       {retrying}
                FROM pg_class c LEFT JOIN pg_class dc ON dc.oid = to_regclass({dlq_reg})
                WHERE c.oid = {reg}::regclass
                """
            ).format(
                name=sql.Literal(queue),
                limit=sql.Literal(limit),
                t=table,
                reg=regclass,
                dlq_reg=dlq_regclass,
                depth=_capped_count(table, "true", limit),
                visible=_capped_count(table, "vt <= clock_timestamp()", limit),
                # held by a worker now, versus invisible after a recorded retry (its delivery closed): the two
                # look alike in pgmq (read, vt in the future) and differ in pg-worker's closed-delivery header
                in_flight=_capped_count(table, _HELD_NOW, limit),
                retrying=_capped_count(table, f"read_ct > 0 AND vt > clock_timestamp() AND NOT {_HELD_NOW}", limit),
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
