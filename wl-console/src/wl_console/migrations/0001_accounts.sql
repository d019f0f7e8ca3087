-- Operator accounts, their sessions, login attempts (for throttling) and the audit trail of console writes.
CREATE TABLE console.users (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username            text NOT NULL UNIQUE CHECK (username ~ '^[a-z0-9][a-z0-9._@-]{0,63}$'),
    role                text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    password_hash       text NOT NULL CHECK (password_hash LIKE '$argon2%'),
    disabled            boolean NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    password_changed_at timestamptz NOT NULL DEFAULT now()
);

-- The cookie holds a random token; the table holds only its SHA-256, so a copy of the table opens no session.
CREATE TABLE console.sessions (
    token_hash   text PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES console.users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_seen_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    client       text
);
CREATE INDEX sessions_user_idx ON console.sessions (user_id);
CREATE INDEX sessions_last_seen_idx ON console.sessions (last_seen_at);

CREATE TABLE console.login_attempts (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    username text NOT NULL,
    client   text NOT NULL,
    ok       boolean NOT NULL
);
CREATE INDEX login_attempts_username_at_idx ON console.login_attempts (username, at);
CREATE INDEX login_attempts_client_at_idx ON console.login_attempts (client, at);

-- Every write made through the console or its CLI: who, what, on what, with the old and new values.
CREATE TABLE console.audit (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor  text NOT NULL,
    action text NOT NULL,
    target text,
    detail jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_at_idx ON console.audit (at DESC);
