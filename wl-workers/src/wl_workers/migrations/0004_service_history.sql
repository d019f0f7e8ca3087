-- Append-only history of each customer service: events, desired changes, router actions and reads, dead letters,
-- operator changes. No foreign key: the history outlives a removed service.
CREATE TABLE wl.service_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    service_id  text NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind        text NOT NULL,     -- event_accepted | event_stale | desired_changed | router_action | router_read |
                                   -- dead_letter | operator | service_added | service_removed | service_moved | service_updated
    source      text,              -- webhook | payment_sync | operator | console | reconcile | worker
    actor       text,
    reason      text,
    event_id    text,
    payment_id  text,
    state       text,
    outcome     text,              -- applied | verified | unchanged | error | busy | stale | lock_lost | ...
    error_class text,
    duration_ms double precision,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX service_history_service_at_idx ON wl.service_history (service_id, at DESC);
CREATE INDEX service_history_at_idx ON wl.service_history (at);  -- retention prune
