"""Every SQL statement of payment-webhook, in one place. Nothing here is assembled from request data."""

from __future__ import annotations

from psycopg import sql

# Held for the whole migration transaction: two `payment-webhook migrate` at once run one after the other.
# The key is fixed (the bytes "webhook!" as a bigint), distinct from pg-worker's own install lock.
MIGRATION_LOCK_KEY = 0x776562686F6F6B21

LOCK = "SELECT pg_advisory_xact_lock(%s)"

CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS webhook"

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS webhook.schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

APPLIED_VERSIONS = "SELECT version FROM webhook.schema_migrations ORDER BY version"

RECORD_MIGRATION = "INSERT INTO webhook.schema_migrations (version, name) VALUES (%s, %s)"

# Forward-only, append-only: a released migration is never edited; a change is a new version.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "events",
        """
        CREATE TABLE webhook.events (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            provider text NOT NULL,
            event_id text NOT NULL,
            type text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            event_at timestamptz,
            payload jsonb NOT NULL,
            queue text,
            msg_id bigint,
            CONSTRAINT events_provider_event_id_key UNIQUE (provider, event_id),
            CONSTRAINT events_provider_check CHECK (provider <> ''),
            CONSTRAINT events_event_id_check CHECK (event_id <> '')
        );
        CREATE INDEX events_received_at_idx ON webhook.events (received_at);
        COMMENT ON TABLE webhook.events IS 'Every accepted provider event, once; queue/msg_id name the job it enqueued.'
        """,
    ),
    (
        2,
        "event_outcome_and_payment",
        """
        ALTER TABLE webhook.events
            ADD COLUMN outcome text,
            ADD COLUMN amount numeric(14, 2),
            ADD COLUMN currency text,
            ADD COLUMN service_id text,
            ADD COLUMN payment_id text,
            ADD CONSTRAINT events_amount_check CHECK (amount > 0),
            ADD CONSTRAINT events_currency_check CHECK (currency ~ '^[A-Z]{3}$');
        -- The operator's list of events that named no known service (and any other outcome), newest first.
        CREATE INDEX events_outcome_received_at_idx ON webhook.events (outcome, received_at DESC);
        COMMENT ON COLUMN webhook.events.outcome IS
            'accepted | stored | ignored | unknown_service: what the webhook did with the event when it arrived';
        """,
    ),
)

INSERT_EVENT = """
INSERT INTO webhook.events (provider, event_id, type, event_at, payload, outcome, amount, currency, service_id, payment_id)
VALUES (%(provider)s, %(event_id)s, %(type)s, %(event_at)s, %(payload)s, %(outcome)s, %(amount)s, %(currency)s,
        %(service_id)s, %(payment_id)s)
ON CONFLICT (provider, event_id) DO NOTHING
RETURNING id
"""

# How every event's transaction begins, in one round trip (several statements, so it goes by the simple query
# protocol; its only values are the two timeouts, integers from the settings, passed as literals):
# - BEGIN, and the transaction's database budget (SET LOCAL, so it also holds through PgBouncer's transaction
#   mode): a locked table or a slow statement ends in an error (503) well before the provider's own timeout
#   (Mercado Pago gives up after 22 s), instead of holding the request open;
# - whether wl.service_exists(text) can be called (wl-workers' migration 0003 creates it, SECURITY DEFINER): when
#   it cannot (absent, or no privilege), every service counts as existing and nothing fails or aborts.
_BEGIN_EVENT = sql.SQL("""
BEGIN;
SET LOCAL statement_timeout = {statement_ms};
SET LOCAL lock_timeout = {lock_ms};
SELECT CASE WHEN to_regnamespace('wl') IS NULL THEN false
            WHEN NOT has_schema_privilege(to_regnamespace('wl')::oid, 'USAGE') THEN false
            WHEN to_regprocedure('wl.service_exists(text)') IS NULL THEN false
            ELSE has_function_privilege(to_regprocedure('wl.service_exists(text)')::oid, 'EXECUTE')
       END
""")


def begin_event(statement_ms: int, lock_ms: int) -> sql.Composed:
    return _BEGIN_EVENT.format(statement_ms=sql.Literal(int(statement_ms)), lock_ms=sql.Literal(int(lock_ms)))


COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"

SERVICE_EXISTS = "SELECT wl.service_exists(%s)"

LIST_EVENTS = """
SELECT id, received_at, provider, event_id, type, outcome, service_id, payment_id, amount, currency
FROM webhook.events
WHERE (%(outcome)s::text IS NULL OR outcome = %(outcome)s) AND received_at >= now() - make_interval(secs => %(since)s)
ORDER BY received_at DESC, id DESC
LIMIT %(limit)s
"""

# In batches, so a first prune of a large table neither holds a long lock nor one huge transaction.
PRUNE_EVENTS = """
DELETE FROM webhook.events
WHERE id IN (
    SELECT id FROM webhook.events WHERE received_at < now() - make_interval(days => %(days)s) ORDER BY received_at LIMIT %(batch)s
)
"""

SET_EVENT_JOB = "UPDATE webhook.events SET queue = %(queue)s, msg_id = %(msg_id)s WHERE id = %(id)s"

READY = "SELECT 1"
