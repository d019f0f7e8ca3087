"""Every SQL statement of payment-webhook, in one place. Nothing here is assembled from request data."""

from __future__ import annotations

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
)

INSERT_EVENT = """
INSERT INTO webhook.events (provider, event_id, type, event_at, payload)
VALUES (%(provider)s, %(event_id)s, %(type)s, %(event_at)s, %(payload)s)
ON CONFLICT (provider, event_id) DO NOTHING
RETURNING id
"""

SET_EVENT_JOB = "UPDATE webhook.events SET queue = %(queue)s, msg_id = %(msg_id)s WHERE id = %(id)s"

READY = "SELECT 1"
