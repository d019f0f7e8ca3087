"""All of wl-workers' SQL, in one place. Nothing here is assembled from input: values travel as parameters."""

from __future__ import annotations

# Advisory-lock namespaces (first key of the two-int form). Arbitrary constants; chosen once, never changed.
LOCK_MIGRATE = 0x574C0001
LOCK_SERVICE = 0x574C0002
LOCK_RECONCILE = 0x574C0003
# The device slot locks use hashtext('wl.device:' || name) as the first key and the slot number as the second.

MIGRATION_LOCK = f"SELECT pg_advisory_xact_lock({LOCK_MIGRATE}, 0)"
MIGRATION_TABLE = """
CREATE SCHEMA IF NOT EXISTS wl;
CREATE TABLE IF NOT EXISTS wl.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
MIGRATIONS_TABLE_EXISTS = "SELECT to_regclass('wl.schema_migrations') IS NOT NULL"
APPLIED_MIGRATIONS = "SELECT version, name, checksum FROM wl.schema_migrations ORDER BY version"
RECORD_MIGRATION = "INSERT INTO wl.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)"

# -- devices ------------------------------------------------------------------------------------------------

DEVICE_COLUMNS = (
    "id, name, driver, host, port, scheme, ca_file, tls_insecure, username, password_ref, max_concurrent, address_list"
)
INSERT_DEVICE = """
INSERT INTO wl.devices (name, driver, host, port, scheme, ca_file, tls_insecure, username, password_ref,
                        max_concurrent, address_list)
VALUES (%(name)s, %(driver)s, %(host)s, %(port)s, %(scheme)s, %(ca_file)s, %(tls_insecure)s, %(username)s,
        %(password_ref)s, %(max_concurrent)s, %(address_list)s)
RETURNING id
"""
LIST_DEVICES = f"SELECT {DEVICE_COLUMNS} FROM wl.devices ORDER BY name"
GET_DEVICE = f"SELECT {DEVICE_COLUMNS} FROM wl.devices WHERE name = %s"
GET_DEVICE_BY_ID = f"SELECT {DEVICE_COLUMNS} FROM wl.devices WHERE id = %s"
DEVICE_SERVICE_COUNT = "SELECT count(*) FROM wl.customer_services WHERE device_id = %s"
DELETE_DEVICE = "DELETE FROM wl.devices WHERE name = %s"
# Only for the demo device: the simulator's port may change between runs of ./scripts/dev.
MOVE_DEVICE = "UPDATE wl.devices SET host = %(host)s, port = %(port)s, scheme = %(scheme)s WHERE name = %(name)s"

# -- services -----------------------------------------------------------------------------------------------

SERVICE_COLUMNS = """
s.service_id, d.name, s.method, s.target, s.desired_state, s.desired_event_at, s.applied_state,
s.applied_event_at, s.applied_at, s.last_error, s.last_error_at, s.device_id
"""
INSERT_SERVICE = """
INSERT INTO wl.customer_services (service_id, device_id, method, target, desired_state)
SELECT %(service_id)s, d.id, %(method)s, %(target)s, %(desired_state)s FROM wl.devices d WHERE d.name = %(device)s
RETURNING service_id
"""
GET_SERVICE = f"""
SELECT {SERVICE_COLUMNS} FROM wl.customer_services s JOIN wl.devices d ON d.id = s.device_id
WHERE s.service_id = %s
"""
LIST_SERVICES = f"""
SELECT {SERVICE_COLUMNS} FROM wl.customer_services s JOIN wl.devices d ON d.id = s.device_id
WHERE %(device)s::text IS NULL OR d.name = %(device)s::text
ORDER BY d.name, s.service_id
"""

# An action that is not stale first records what is now desired (kept even when the device call fails).
ACCEPT_ACTION = """
UPDATE wl.customer_services
SET desired_state = %(state)s, desired_event_at = %(event_at)s, updated_at = now()
WHERE service_id = %(service_id)s
"""
RECORD_APPLIED = """
UPDATE wl.customer_services
SET applied_state = %(state)s, applied_event_at = %(event_at)s, applied_at = now(),
    last_error = NULL, last_error_at = NULL, updated_at = now()
WHERE service_id = %(service_id)s
"""
RECORD_ERROR = """
UPDATE wl.customer_services SET last_error = %(error)s, last_error_at = now(), updated_at = now()
WHERE service_id = %(service_id)s
"""

# -- locks --------------------------------------------------------------------------------------------------

# Blocks until the service is free or lock_timeout (set per transaction) ends the wait with LockNotAvailable.
LOCK_SERVICE_XACT = f"SELECT pg_advisory_xact_lock({LOCK_SERVICE}, hashtext(%s))"
SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %s, true)"
TRY_DEVICE_SLOT = "SELECT pg_try_advisory_xact_lock(hashtext('wl.device:' || %s), %s)"
TRY_RECONCILE_LOCK = f"SELECT pg_try_advisory_lock({LOCK_RECONCILE}, 0)"
RELEASE_RECONCILE_LOCK = f"SELECT pg_advisory_unlock({LOCK_RECONCILE}, 0)"
SERVICE_EXISTS = "SELECT 1 FROM wl.customer_services WHERE service_id = %s"

# -- operator commands (service remove/move/update, device update, history, import) ------------------------------

SERVICE_ID_CASEFOLD = "SELECT service_id FROM wl.customer_services WHERE lower(service_id) = lower(%s)"
SERVICE_AT_TARGET = """
SELECT s.service_id FROM wl.customer_services s JOIN wl.devices d ON d.id = s.device_id
WHERE d.name = %(device)s AND s.method = %(method)s AND s.target = %(target)s
"""
DELETE_SERVICE = "DELETE FROM wl.customer_services WHERE service_id = %s"
UPDATE_SERVICE = """
UPDATE wl.customer_services s
SET device_id = d.id, method = %(method)s, target = %(target)s, updated_at = now()
FROM wl.devices d
WHERE s.service_id = %(service_id)s AND d.name = %(device)s
"""
UPDATE_DEVICE = """
UPDATE wl.devices
SET driver = %(driver)s, host = %(host)s, port = %(port)s, scheme = %(scheme)s, ca_file = %(ca_file)s,
    tls_insecure = %(tls_insecure)s, username = %(username)s, password_ref = %(password_ref)s,
    max_concurrent = %(max_concurrent)s, address_list = %(address_list)s, updated_at = now()
WHERE name = %(name)s
"""
PRUNE_HISTORY = "DELETE FROM wl.service_history WHERE at < now() - %s::double precision * interval '1 day'"
DEVICE_TEST_RESULT = "SELECT ok, message, at FROM wl.device_tests WHERE request_id = %s"
COUNT_SERVICES_OFF_DEVICE = """
SELECT count(*) FROM wl.customer_services s JOIN wl.devices d ON d.id = s.device_id WHERE d.name <> %s
"""
# the newest history row that set the service's current desired state (the one-line "why" of `service show`)
LAST_CAUSE = """
SELECT id, service_id, at, kind, source, actor, reason, event_id, payment_id, state, outcome, error_class, duration_ms,
       detail
FROM wl.service_history
WHERE service_id = %s AND kind = ANY(%s) AND (state IS NULL OR state = %s)
ORDER BY at DESC, id DESC LIMIT 1
"""
LAST_ROUTER_READ = """
SELECT at, state, outcome, detail FROM wl.service_history
WHERE service_id = %s AND kind IN ('router_read', 'router_action') ORDER BY at DESC, id DESC LIMIT 1
"""
LAST_HISTORY_ID = "SELECT coalesce(max(id), 0) FROM wl.service_history WHERE service_id = %s"
ROUTER_READ_AFTER = """
SELECT at, state, outcome, error_class, detail FROM wl.service_history
WHERE service_id = %s AND kind = 'router_read' AND id > %s ORDER BY id LIMIT 1
"""
