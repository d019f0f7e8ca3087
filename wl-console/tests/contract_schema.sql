-- TEST FIXTURE ONLY, TO BE REMOVED AT MERGE (the lead): the columns and tables that helpers "wl" (migrations 0003
-- and 0004 of wl-workers) and "webhook" (payment-webhook's events outcome columns) add in round 3, written here
-- exactly as CONTRACT.md describes them so that wl-console's tests run before those branches are merged. Every
-- statement is IF NOT EXISTS: once the real migrations have run, this file changes nothing.

ALTER TABLE wl.customer_services
    ADD COLUMN IF NOT EXISTS desired_generation bigint NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS applied_generation bigint,
    ADD COLUMN IF NOT EXISTS observed_state text,
    ADD COLUMN IF NOT EXISTS observed_at timestamptz,
    ADD COLUMN IF NOT EXISTS desired_reason text,
    ADD COLUMN IF NOT EXISTS desired_source text,
    ADD COLUMN IF NOT EXISTS desired_actor text,
    ADD COLUMN IF NOT EXISTS desired_changed_at timestamptz;

ALTER TABLE wl.devices
    ADD COLUMN IF NOT EXISTS own_entries_only boolean NOT NULL DEFAULT true,
    ADD COLUMN IF NOT EXISTS last_contact_at timestamptz,
    ADD COLUMN IF NOT EXISTS last_error text,
    ADD COLUMN IF NOT EXISTS last_error_at timestamptz;

CREATE TABLE IF NOT EXISTS wl.device_tests (
    request_id text PRIMARY KEY,
    device     text NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    ok         boolean NOT NULL,
    message    text
);

CREATE TABLE IF NOT EXISTS wl.service_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    service_id  text NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind        text NOT NULL,
    source      text,
    actor       text,
    reason      text,
    event_id    text,
    payment_id  text,
    state       text,
    outcome     text,
    error_class text,
    duration_ms double precision,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS service_history_service_at_idx ON wl.service_history (service_id, at DESC);

ALTER TABLE webhook.events
    ADD COLUMN IF NOT EXISTS outcome text,
    ADD COLUMN IF NOT EXISTS amount numeric,
    ADD COLUMN IF NOT EXISTS currency text,
    ADD COLUMN IF NOT EXISTS service_id text,
    ADD COLUMN IF NOT EXISTS payment_id text;
