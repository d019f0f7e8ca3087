-- Level-triggered convergence: the row holds the desired state and its generation; a worker records the
-- generation it verified on the router (applied_generation) only while that generation is still the desired one.
ALTER TABLE wl.customer_services
    ADD COLUMN desired_generation bigint NOT NULL DEFAULT 1,
    ADD COLUMN applied_generation bigint,
    ADD COLUMN observed_state     text CHECK (observed_state IN ('active', 'suspended', 'unknown')),
    ADD COLUMN observed_at        timestamptz,                 -- when a worker last read the router for it
    ADD COLUMN desired_reason     text,                        -- why the desired state last changed
    ADD COLUMN desired_source     text,                        -- webhook | payment_sync | operator | console | reconcile | worker
    ADD COLUMN desired_actor      text,
    ADD COLUMN desired_changed_at timestamptz;
-- rows converged before this migration: their applied state is the desired state of generation 1
UPDATE wl.customer_services SET applied_generation = 1 WHERE applied_state = desired_state;
COMMENT ON COLUMN wl.customer_services.applied_at IS 'when the router was verified in the applied state';
COMMENT ON COLUMN wl.customer_services.target IS
    'address-list: IPv4/IPv6 address or prefix (canonical, host addresses without /32 or /128); pppoe: the PPP user';

ALTER TABLE wl.devices
    ADD COLUMN own_entries_only  boolean NOT NULL DEFAULT true, -- restore removes only the entries we created
    ADD COLUMN last_contact_at   timestamptz,                   -- last answer that was not an error
    ADD COLUMN last_error        text,
    ADD COLUMN last_error_at     timestamptz,
    -- circuit breaker: consecutive transient failures; at the threshold jobs park until a probe succeeds
    ADD COLUMN breaker_failures  integer NOT NULL DEFAULT 0,
    ADD COLUMN breaker_probe_at  timestamptz;                    -- no probe starts before this (one at a time)

-- Jobs parked while their device's breaker is open: woken (pgmq set_vt) by the first success on the device.
CREATE TABLE wl.parked_actions (
    msg_id    bigint PRIMARY KEY,
    device_id bigint NOT NULL REFERENCES wl.devices (id) ON DELETE CASCADE,
    parked_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX parked_actions_device_idx ON wl.parked_actions (device_id);

-- Results of `device.test` jobs (the operator's "can the worker reach and log in to this router?").
CREATE TABLE wl.device_tests (
    request_id text PRIMARY KEY,
    device     text NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    ok         boolean NOT NULL,
    message    text NOT NULL DEFAULT ''
);

-- For payment-webhook's "unknown_service" outcome: a yes/no, without read access to the table.
CREATE FUNCTION wl.service_exists(p_service_id text) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT EXISTS (SELECT 1 FROM wl.customer_services WHERE service_id = p_service_id) $$;
