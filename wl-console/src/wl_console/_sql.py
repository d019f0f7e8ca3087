"""Every SQL statement of wl-console, in one place. Values always travel as parameters; the few statements
that name a queue table build the identifier from a validated queue name (``queue_table``), quoted by psycopg;
the customer search is assembled from the fixed fragments below, chosen by which filters are on."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from psycopg import sql

from pg_worker import validate_queue_name

# -- migrations ----------------------------------------------------------------------------------------------

LOCK_MIGRATE = 0x574C4301  # "WLC" + 1: distinct from wl-workers' 0x574C0001 and pg-worker's install lock
TABLE_EXISTS = "SELECT to_regclass(%s) IS NOT NULL"

# Indexes for the console's searches on tables other packages own (see _migrate.py): (name, table, statement).
SEARCH_INDEXES: tuple[tuple[str, str, str], ...] = (
    ("console_services_id_pattern_idx", "wl.customer_services",
     "CREATE INDEX IF NOT EXISTS console_services_id_pattern_idx ON wl.customer_services (service_id text_pattern_ops)"),
    ("console_services_target_pattern_idx", "wl.customer_services",
     "CREATE INDEX IF NOT EXISTS console_services_target_pattern_idx ON wl.customer_services (target text_pattern_ops)"),
    ("console_events_service_idx", "webhook.events",
     "CREATE INDEX IF NOT EXISTS console_events_service_idx ON webhook.events (service_id, id DESC)"),
    ("console_events_payment_idx", "webhook.events",
     "CREATE INDEX IF NOT EXISTS console_events_payment_idx ON webhook.events (payment_id)"),
    ("console_events_event_idx", "webhook.events",
     "CREATE INDEX IF NOT EXISTS console_events_event_idx ON webhook.events (event_id)"),
)

READY = "SELECT 1 FROM console.schema_migrations LIMIT 1"

# -- accounts -------------------------------------------------------------------------------------------------

INSERT_USER = """
INSERT INTO console.users (username, role, password_hash) VALUES (%(username)s, %(role)s, %(password_hash)s)
RETURNING id
"""
GET_USER = "SELECT id, username, role, password_hash, disabled FROM console.users WHERE username = %s"
SET_PASSWORD = """
UPDATE console.users SET password_hash = %(password_hash)s, password_changed_at = now(), updated_at = now()
WHERE username = %(username)s RETURNING id
"""
SET_ROLE = "UPDATE console.users SET role = %(role)s, updated_at = now() WHERE username = %(username)s RETURNING id"
SET_DISABLED = "UPDATE console.users SET disabled = %(disabled)s, updated_at = now() WHERE username = %(username)s RETURNING id"
LIST_USERS = "SELECT username, role, disabled, created_at, password_changed_at FROM console.users ORDER BY username"
DELETE_USER_SESSIONS = "DELETE FROM console.sessions WHERE user_id = (SELECT id FROM console.users WHERE username = %s)"

INSERT_SESSION = """
INSERT INTO console.sessions (token_hash, user_id, created_at, last_seen_at, client)
VALUES (%(token_hash)s, %(user_id)s, %(now)s, %(now)s, %(client)s)
"""
# The role and the disabled flag are read again on every request: a change takes effect at the next click.
GET_SESSION = """
SELECT u.id, u.username, u.role, u.disabled, s.created_at, s.last_seen_at
FROM console.sessions s JOIN console.users u ON u.id = s.user_id
WHERE s.token_hash = %s
"""
TOUCH_SESSION = "UPDATE console.sessions SET last_seen_at = %(now)s WHERE token_hash = %(token_hash)s"
DELETE_SESSION = "DELETE FROM console.sessions WHERE token_hash = %s"
PRUNE_SESSIONS = "DELETE FROM console.sessions WHERE last_seen_at < %(idle_before)s OR created_at < %(created_before)s"

RECENT_FAILURES = """
SELECT count(*) FILTER (WHERE username = %(username)s), count(*) FILTER (WHERE client = %(client)s)
FROM console.login_attempts
WHERE NOT ok AND at > %(since)s AND (username = %(username)s OR client = %(client)s)
"""
INSERT_ATTEMPT = "INSERT INTO console.login_attempts (at, username, client, ok) VALUES (%(now)s, %(username)s, %(client)s, %(ok)s)"
PRUNE_ATTEMPTS = "DELETE FROM console.login_attempts WHERE at < %s"

INSERT_AUDIT = """
INSERT INTO console.audit (actor, action, target, detail) VALUES (%(actor)s, %(action)s, %(target)s, %(detail)s)
"""

# -- customers ------------------------------------------------------------------------------------------------

# Router differs from desired: not (yet) applied, or the router was last seen in the other state.
DIVERGED = """(s.applied_state IS DISTINCT FROM s.desired_state
               OR (s.observed_state IN ('active', 'suspended') AND s.observed_state <> s.desired_state))"""

CUSTOMER_COLUMNS = f"""
s.service_id, d.name, s.method, s.target, s.desired_state, s.desired_generation, s.applied_state,
s.applied_generation, s.applied_at, s.observed_state, s.observed_at, s.last_error, s.last_error_at,
s.desired_reason, s.desired_source, s.desired_actor, s.desired_changed_at, {DIVERGED}
"""

_CUSTOMER_FILTERS: dict[str, str] = {
    # q: a service id or target prefix (LIKE escapes applied by the caller), or a device name
    # (the router as a device_id list, so that each arm can use an index on s: a BitmapOr, not a scan of the join)
    "q": "(s.service_id LIKE %(prefix)s OR s.target LIKE %(prefix)s OR s.device_id = ANY(ARRAY(SELECT id FROM wl.devices WHERE name = %(q)s)))",
    # ip: a whole address finds that customer only (10.0.0.3 is not 10.0.0.30)
    "ip": "(s.target = %(q)s OR s.service_id = %(q)s)",
    # net: addresses inside a prefix; the CASE keeps PPPoE user names away from the inet cast
    "net": "(CASE WHEN s.method = 'address-list' THEN s.target::inet <<= %(net)s::inet ELSE false END)",
    "device": "d.name = %(device)s",
    "suspended": "s.desired_state = 'suspended'",
    "diverged": DIVERGED,
    "errors": "s.last_error IS NOT NULL",
    "pending": "s.service_id IN (SELECT m.message->>'service_id' FROM pgmq.q_device_actions m)",
    "no_pending": "false",  # the pending filter while the queue does not exist
    "after": "s.service_id > %(after)s",
}


def _where(filters: Iterable[str], fragments: Mapping[str, str], what: str) -> sql.Composable:
    """The WHERE condition of a search: the fixed fragments of the filters that are on, joined by AND."""
    wanted = sorted(set(filters))
    unknown = set(wanted) - fragments.keys()
    if unknown:
        raise ValueError(f"unknown {what} filters: {sorted(unknown)}")
    return sql.SQL(" AND ").join([sql.SQL(fragments[f]) for f in wanted]) if wanted else sql.SQL("true")


def list_customers(filters: Iterable[str]) -> sql.Composed:
    """The customer search with the given filters on, ordered by service id (keyset pagination: ``after``)."""
    where = _where(filters, _CUSTOMER_FILTERS, "customer")
    return sql.SQL(
        "SELECT " + CUSTOMER_COLUMNS + " FROM wl.customer_services s JOIN wl.devices d ON d.id = s.device_id "
        "WHERE {where} ORDER BY s.service_id LIMIT %(limit)s"
    ).format(where=where)


GET_CUSTOMER = f"""
SELECT {CUSTOMER_COLUMNS} FROM wl.customer_services s JOIN wl.devices d ON d.id = s.device_id
WHERE s.service_id = %s
"""

HISTORY = """
SELECT id, at, kind, source, actor, reason, event_id, payment_id, state, outcome, error_class, duration_ms, detail
FROM wl.service_history
WHERE service_id = %(service_id)s AND (%(before)s::bigint IS NULL OR id < %(before)s::bigint)
ORDER BY id DESC LIMIT %(limit)s
"""
INSERT_HISTORY = """
INSERT INTO wl.service_history (service_id, kind, source, actor, reason, state, event_id, detail)
VALUES (%(service_id)s, 'operator', 'console', %(actor)s, %(reason)s, %(state)s, %(event_id)s, %(detail)s)
"""

PENDING_FOR_SERVICE = """
SELECT msg_id, enqueued_at, vt, read_ct, message FROM pgmq.q_device_actions
WHERE message->>'service_id' = %s ORDER BY msg_id LIMIT 20
"""
PENDING_COUNTS = """
SELECT message->>'service_id', count(*) FROM pgmq.q_device_actions
WHERE message->>'service_id' = ANY(%s) GROUP BY 1
"""
DEAD_FOR_SERVICE = """
SELECT msg_id, enqueued_at, message FROM pgmq.q_device_actions_dlq
WHERE message->'message'->>'service_id' = %s ORDER BY msg_id DESC LIMIT 20
"""
PAYMENTS_FOR_SERVICE = """
SELECT id, provider, event_id, type, received_at, outcome, service_id, payment_id, amount, currency
FROM webhook.events WHERE service_id = %s ORDER BY id DESC LIMIT 20
"""

# -- routers --------------------------------------------------------------------------------------------------

LIST_ROUTERS = f"""
SELECT d.name, d.driver, d.host, d.port, d.scheme, d.last_contact_at, d.last_error, d.last_error_at,
       coalesce(c.services, 0), coalesce(c.diverged, 0), coalesce(c.suspended, 0)
FROM wl.devices d
LEFT JOIN (
    SELECT s.device_id, count(*) AS services, count(*) FILTER (WHERE {DIVERGED}) AS diverged,
           count(*) FILTER (WHERE s.desired_state = 'suspended') AS suspended
    FROM wl.customer_services s GROUP BY s.device_id
) c ON c.device_id = d.id
WHERE %(device)s::text IS NULL OR d.name = %(device)s::text
ORDER BY d.name
"""
# Jobs waiting per router: a service job counts for its service's router, a device.test for the router it names.
PENDING_PER_ROUTER = """
SELECT coalesce(sd.name, m.message->>'device'), count(*)
FROM pgmq.q_device_actions m
LEFT JOIN wl.customer_services s ON s.service_id = m.message->>'service_id'
LEFT JOIN wl.devices sd ON sd.id = s.device_id
GROUP BY 1
"""
DEVICE_EXISTS = "SELECT 1 FROM wl.devices WHERE name = %s"
DEVICE_TESTS = "SELECT request_id, at, ok, message FROM wl.device_tests WHERE device = %s ORDER BY at DESC LIMIT 10"

# -- payments -------------------------------------------------------------------------------------------------

_PAYMENT_FILTERS: dict[str, str] = {
    "outcome": "outcome = %(outcome)s",
    "service_id": "service_id = %(service_id)s",
    "q": "(payment_id = %(q)s OR event_id = %(q)s OR service_id = %(q)s)",
    "before": "id < %(before)s",
}


def list_payments(filters: Iterable[str]) -> sql.Composed:
    where = _where(filters, _PAYMENT_FILTERS, "payment")
    return sql.SQL(
        "SELECT id, provider, event_id, type, received_at, outcome, service_id, payment_id, amount, currency "
        "FROM webhook.events WHERE {where} ORDER BY id DESC LIMIT %(limit)s"
    ).format(where=where)


# -- queues ---------------------------------------------------------------------------------------------------

DEVICE_ACTIONS = "device_actions"
DLQ_SUFFIX = "_dlq"  # pg-worker's convention: queue_stats tells dead-letter queues apart by it (elsewhere: pg_worker.dlq_name)
# pg-worker's header on a message whose last delivery ended with a recorded retry (its value: that read_ct).
RETRY_HEADER = "x-pg-worker-closed"
STATS_CAP = 100_000  # counts stop here (shown as "100000+"): no full scan of a runaway queue from a web page

LIST_QUEUES = "SELECT queue_name FROM pgmq.meta ORDER BY queue_name"
PGMQ_EXISTS = "SELECT to_regclass('pgmq.meta') IS NOT NULL"


def queue_table(queue: str) -> str:
    """pgmq's table of ``queue`` (without the schema), from a name pg-worker accepts."""
    return "q_" + validate_queue_name(queue, allow_dlq=True)


def qualified(queue: str) -> str:
    return f"pgmq.{queue_table(queue)}"


def queue_stats(queue: str) -> sql.Composed:
    """Depth, ready, in flight, waiting for a retry, scheduled, oldest age (s), of one queue, capped."""
    return sql.SQL(
        """
        SELECT count(*), count(*) FILTER (WHERE vt <= clock_timestamp()),
               count(*) FILTER (WHERE vt > clock_timestamp() AND read_ct > 0
                                AND (headers->>{retry}) IS DISTINCT FROM read_ct::text),
               count(*) FILTER (WHERE vt > clock_timestamp() AND read_ct > 0 AND (headers->>{retry}) = read_ct::text),
               count(*) FILTER (WHERE vt > clock_timestamp() AND read_ct = 0),
               extract(epoch FROM clock_timestamp() - min(enqueued_at))::float8
        FROM (SELECT vt, read_ct, headers, enqueued_at FROM pgmq.{t} LIMIT {cap}) m
        """
    ).format(retry=sql.Literal(RETRY_HEADER), t=sql.Identifier(queue_table(queue)), cap=sql.Literal(STATS_CAP + 1))


def dlq_count(dlq: str) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM (SELECT 1 FROM pgmq.{t} LIMIT {cap}) m").format(
        t=sql.Identifier(queue_table(dlq)), cap=sql.Literal(STATS_CAP + 1)
    )


def dlq_list(dlq: str) -> sql.Composed:
    """Dead letters oldest first, after ``after`` (keyset), optionally of one job type / one service."""
    return sql.SQL(
        """
        SELECT msg_id, enqueued_at, message FROM pgmq.{t}
        WHERE (%(after)s::bigint IS NULL OR msg_id > %(after)s::bigint)
          AND (%(type)s::text IS NULL OR message->'message'->>'type' = %(type)s::text)
          AND (%(service_id)s::text IS NULL OR message->'message'->>'service_id' = %(service_id)s::text)
        ORDER BY msg_id LIMIT %(limit)s
        """
    ).format(t=sql.Identifier(queue_table(dlq)))


def dlq_show(dlq: str) -> sql.Composed:
    return sql.SQL("SELECT msg_id, enqueued_at, message FROM pgmq.{t} WHERE msg_id = %s").format(t=sql.Identifier(queue_table(dlq)))


def dlq_replay(dlq: str) -> sql.Composed:
    """pg-worker's replay (``pg-worker dlq replay``): delete from the DLQ and send the original message and headers
    back to its queue as a new message, in one statement; returns (dlq id, new msg id, the original message)."""
    return sql.SQL(
        """
        WITH moved AS (DELETE FROM pgmq.{t} WHERE msg_id = ANY(%(ids)s::bigint[]) RETURNING msg_id, message)
        SELECT moved.msg_id,
               pgmq.send(%(queue)s, moved.message->'message', nullif(moved.message->'headers', 'null'::jsonb)),
               moved.message->'message'
        FROM moved ORDER BY moved.msg_id
        """
    ).format(t=sql.Identifier(queue_table(dlq)))


def dlq_purge(dlq: str) -> sql.Composed:
    return sql.SQL("DELETE FROM pgmq.{t} WHERE msg_id = ANY(%(ids)s::bigint[]) RETURNING msg_id, message->'message'").format(
        t=sql.Identifier(queue_table(dlq))
    )


def dlq_purge_all(dlq: str) -> sql.Composed:
    return sql.SQL("DELETE FROM pgmq.{t} RETURNING msg_id, message->'message'").format(t=sql.Identifier(queue_table(dlq)))
