-- Devices (routers) and the customer services switched on them.
CREATE TABLE wl.devices (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    driver         text NOT NULL DEFAULT 'routeros-rest' CHECK (driver IN ('routeros-rest')),
    host           text NOT NULL CHECK (host <> ''),
    port           integer CHECK (port BETWEEN 1 AND 65535),          -- NULL: the scheme's default
    scheme         text NOT NULL DEFAULT 'https' CHECK (scheme IN ('https', 'http')),
    ca_file        text,                                               -- NULL: the system's CAs
    tls_insecure   boolean NOT NULL DEFAULT false,
    username       text NOT NULL CHECK (username <> ''),
    -- a reference, never the password: env:NAME or file:/absolute/path, resolved at each use
    password_ref   text NOT NULL CHECK (password_ref ~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+)$'),
    max_concurrent integer NOT NULL DEFAULT 2 CHECK (max_concurrent BETWEEN 1 AND 64),
    address_list   text NOT NULL DEFAULT 'morosos' CHECK (address_list <> ''),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE wl.customer_services (
    service_id       text PRIMARY KEY CHECK (length(service_id) BETWEEN 1 AND 200),
    device_id        bigint NOT NULL REFERENCES wl.devices (id) ON DELETE RESTRICT,
    method           text NOT NULL CHECK (method IN ('address-list', 'pppoe')),
    target           text NOT NULL CHECK (target <> ''),               -- the customer's IP, or PPPoE user
    desired_state    text NOT NULL DEFAULT 'active' CHECK (desired_state IN ('active', 'suspended')),
    desired_event_at timestamptz,                                       -- business time of the newest accepted event
    applied_state    text CHECK (applied_state IN ('active', 'suspended')),
    applied_event_at timestamptz,                                       -- business time of the last applied event
    applied_at       timestamptz,                                       -- when it was applied (wall clock)
    last_error       text,
    last_error_at    timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (device_id, method, target)
);

CREATE INDEX customer_services_device_idx ON wl.customer_services (device_id);
