"""All of wl-workers' SQL, in one place. Nothing here is assembled from input: values travel as parameters."""

from __future__ import annotations

# Advisory-lock namespaces (first key of the two-int form). Arbitrary constants; chosen once, never changed.
LOCK_MIGRATE = 0x574C0001
LOCK_SERVICE = 0x574C0002
LOCK_RECONCILE = 0x574C0003
# The device slot locks use hashtext('wl.device:' || name) as the first key and the slot number as the second.

# -- devices ------------------------------------------------------------------------------------------------

DEVICE_COLUMNS = (
    "id, name, driver, host, port, scheme, ca_file, tls_insecure, username, password_ref, max_concurrent, address_list, own_entries_only"
)
INSERT_DEVICE = """
INSERT INTO wl.devices (name, driver, host, port, scheme, ca_file, tls_insecure, username, password_ref,
                        max_concurrent, address_list, own_entries_only)
VALUES (%(name)s, %(driver)s, %(host)s, %(port)s, %(scheme)s, %(ca_file)s, %(tls_insecure)s, %(username)s,
        %(password_ref)s, %(max_concurrent)s, %(address_list)s, %(own_entries_only)s)
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
s.applied_event_at, s.applied_at, s.last_error, s.last_error_at, s.device_id, s.desired_generation,
s.applied_generation, s.observed_state, s.observed_at
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

RECORD_ERROR = """
UPDATE wl.customer_services SET last_error = %(error)s, last_error_at = now(), updated_at = now()
WHERE service_id = %(service_id)s
"""

# -- locks --------------------------------------------------------------------------------------------------

TRY_RECONCILE_LOCK = f"SELECT pg_try_advisory_lock({LOCK_RECONCILE}, 0)"
RELEASE_RECONCILE_LOCK = f"SELECT pg_advisory_unlock({LOCK_RECONCILE}, 0)"
SERVICE_EXISTS = "SELECT 1 FROM wl.customer_services WHERE service_id = %s"

# -- history (migration 0004) -------------------------------------------------------------------------------

INSERT_HISTORY = """
INSERT INTO wl.service_history (service_id, kind, source, actor, reason, event_id, payment_id, state, outcome,
                                error_class, duration_ms, detail)
VALUES (%(service_id)s, %(kind)s, %(source)s, %(actor)s, %(reason)s, %(event_id)s, %(payment_id)s, %(state)s,
        %(outcome)s, %(error_class)s, %(duration_ms)s, %(detail)s)
"""
LIST_HISTORY = """
SELECT id, service_id, at, kind, source, actor, reason, event_id, payment_id, state, outcome, error_class,
       duration_ms, detail
FROM wl.service_history
WHERE service_id = %(service_id)s AND (%(before_id)s::bigint IS NULL OR id < %(before_id)s::bigint)
ORDER BY id DESC LIMIT %(limit)s
"""
PRUNE_HISTORY = "DELETE FROM wl.service_history WHERE at < clock_timestamp() - make_interval(secs => %(days)s * 86400)"
EVENT_SEEN = """
SELECT EXISTS (SELECT 1 FROM wl.service_history
               WHERE service_id = %(service_id)s AND event_id = %(event_id)s AND kind IN ('event_accepted', 'event_stale'))
"""

# -- desired state (migration 0003) -------------------------------------------------------------------------

# One statement decides and records: an event older than the newest accepted one changes nothing (no row);
# a newer or equal one is accepted, and bumps the generation only when the desired state changes.
RECORD_DESIRED = """
UPDATE wl.customer_services s
SET desired_event_at   = %(event_at)s,
    desired_state      = %(state)s,
    desired_generation = s.desired_generation + CASE WHEN s.desired_state <> %(state)s THEN 1 ELSE 0 END,
    desired_reason     = CASE WHEN s.desired_state <> %(state)s THEN %(reason)s ELSE s.desired_reason END,
    desired_source     = CASE WHEN s.desired_state <> %(state)s THEN %(source)s ELSE s.desired_source END,
    desired_actor      = CASE WHEN s.desired_state <> %(state)s THEN %(actor)s ELSE s.desired_actor END,
    desired_changed_at = CASE WHEN s.desired_state <> %(state)s THEN clock_timestamp() ELSE s.desired_changed_at END,
    updated_at         = now()
FROM (SELECT service_id, desired_state FROM wl.customer_services WHERE service_id = %(service_id)s FOR UPDATE) old
WHERE s.service_id = old.service_id AND (s.desired_event_at IS NULL OR s.desired_event_at <= %(event_at)s)
RETURNING s.desired_generation, old.desired_state
"""
DESIRED_OF = "SELECT desired_state, desired_generation, desired_event_at FROM wl.customer_services WHERE service_id = %s"

# The pass records what it verified only while that generation is still the desired one (else: go round again).
RECORD_CONVERGED = """
UPDATE wl.customer_services
SET applied_state = %(state)s, applied_generation = %(generation)s, applied_event_at = desired_event_at,
    applied_at = %(verified_at)s, observed_state = %(state)s, observed_at = %(verified_at)s,
    last_error = NULL, last_error_at = NULL, updated_at = now()
WHERE service_id = %(service_id)s AND desired_generation = %(generation)s
RETURNING service_id
"""
RECORD_OBSERVED = """
UPDATE wl.customer_services SET observed_state = %(observed)s, observed_at = %(at)s, updated_at = now()
WHERE service_id = %(service_id)s
"""
RECORD_OBSERVED_MANY = """
UPDATE wl.customer_services s SET observed_state = v.state, observed_at = %(at)s
FROM unnest(%(ids)s::text[], %(states)s::text[]) AS v(service_id, state)
WHERE s.service_id = v.service_id
"""

# -- device health ------------------------------------------------------------------------------------------

DEVICE_FAILED = """
UPDATE wl.devices
SET breaker_failures = breaker_failures + CASE WHEN %(transient)s THEN 1 ELSE 0 END,
    breaker_probe_at = CASE WHEN %(transient)s AND breaker_failures + 1 >= %(threshold)s
                            THEN clock_timestamp() + make_interval(secs => %(probe_interval)s) ELSE breaker_probe_at END,
    last_error = %(error)s, last_error_at = clock_timestamp()
WHERE id = %(device_id)s
RETURNING breaker_failures
"""
# The device answered: close the breaker; returns the failures counted before (at the threshold: wake everyone).
# Written at most once a second per healthy device, so that busy routers do not queue on their row.
DEVICE_OK = """
UPDATE wl.devices d SET breaker_failures = 0, breaker_probe_at = NULL, last_contact_at = clock_timestamp(),
    last_error = NULL, last_error_at = NULL
FROM (SELECT id, breaker_failures FROM wl.devices WHERE id = %(device_id)s) old
WHERE d.id = old.id AND (d.breaker_failures > 0 OR d.last_error IS NOT NULL OR d.last_contact_at IS NULL
                         OR d.last_contact_at < clock_timestamp() - interval '1 second')
RETURNING old.breaker_failures
"""
DEVICE_BREAKER = "SELECT breaker_failures FROM wl.devices WHERE id = %s"
# Take the one probe of an open breaker: only the caller that moves breaker_probe_at forward may talk to the device.
TAKE_PROBE = """
UPDATE wl.devices SET breaker_probe_at = clock_timestamp() + make_interval(secs => %(probe_interval)s)
WHERE id = %(device_id)s AND breaker_failures >= %(threshold)s
  AND (breaker_probe_at IS NULL OR breaker_probe_at <= clock_timestamp())
RETURNING id
"""
PARK_ACTION = "INSERT INTO wl.parked_actions (msg_id, device_id) VALUES (%s, %s) ON CONFLICT (msg_id) DO NOTHING"
UNPARK_ACTION = "DELETE FROM wl.parked_actions WHERE msg_id = %s"
NOTIFY_ACTIONS = "SELECT pg_notify('pg_worker_device_actions', '')"
# A job that found every slot of its device taken waits its turn: parked, and woken by the job that frees a slot
# (oldest first). Returns how many were parked before it (its own retry, should no wake come, is sized by that).
PARK_BUSY = """
WITH parked AS (INSERT INTO wl.parked_actions (msg_id, device_id) VALUES (%(msg_id)s, %(device_id)s) ON CONFLICT (msg_id) DO NOTHING)
SELECT count(*) FROM wl.parked_actions WHERE device_id = %(device_id)s
"""
# Wake the oldest n jobs parked on a device: due now. Only a message whose deferral pg-worker has recorded (its
# header "closed" = its read_ct: not in flight) is woken; one parked a moment ago, whose deferral is not written
# yet, stays parked for the next wake (waking it then would look to pg-worker like a delivery that died).
WAKE_NEXT = """
WITH cand AS (
    SELECT p.msg_id FROM wl.parked_actions p JOIN pgmq.q_device_actions m ON m.msg_id = p.msg_id
    WHERE p.device_id = %(device_id)s AND (m.headers->>'x-pg-worker-closed')::bigint = m.read_ct AND m.vt > clock_timestamp()
    ORDER BY p.parked_at LIMIT %(n)s
    FOR UPDATE OF p, m SKIP LOCKED
), woken AS (
    UPDATE pgmq.q_device_actions m SET vt = clock_timestamp() FROM cand WHERE m.msg_id = cand.msg_id RETURNING m.msg_id
), unparked AS (
    DELETE FROM wl.parked_actions p USING woken WHERE p.msg_id = woken.msg_id RETURNING p.msg_id
)
SELECT count(*) FROM unparked
"""
WAKE_ALL = 1_000_000  # n for a breaker that closes

# -- session locks on a job's dedicated connection ----------------------------------------------------------

TRY_SERVICE_LOCK = f"SELECT pg_try_advisory_lock({LOCK_SERVICE}, hashtext(%s))"
TRY_DEVICE_SLOT_SESSION = "SELECT pg_try_advisory_lock(hashtext('wl.device:' || %s), %s)"
# how many advisory locks this session holds now: a terminated backend, or a lock released under us, shows here
# The waiting room: max_concurrent jobs per device may wait for a slot in their worker (the hand-over then takes
# one poll, not a wake and a fetch); any further job parks and frees its worker place.
TRY_DEVICE_WAIT = "SELECT pg_try_advisory_lock(hashtext('wl.device-wait:' || %s), %s)"
LEAVE_DEVICE_WAIT = "SELECT pg_advisory_unlock(hashtext('wl.device-wait:' || %s), %s)"
HELD_LOCKS = "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' AND granted"
UNLOCK_ALL = "SELECT pg_advisory_unlock_all()"

# -- device tests -------------------------------------------------------------------------------------------

RECORD_DEVICE_TEST = """
INSERT INTO wl.device_tests (request_id, device, ok, message) VALUES (%(request_id)s, %(device)s, %(ok)s, %(message)s)
ON CONFLICT (request_id) DO UPDATE SET at = clock_timestamp(), ok = EXCLUDED.ok, message = EXCLUDED.message
"""

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
    max_concurrent = %(max_concurrent)s, address_list = %(address_list)s, own_entries_only = %(own_entries_only)s,
    updated_at = now()
WHERE name = %(name)s
"""
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
LAST_HISTORY_ID = "SELECT coalesce(max(id), 0) FROM wl.service_history WHERE service_id = %s"
ROUTER_READ_AFTER = """
SELECT at, state, outcome, error_class, detail FROM wl.service_history
WHERE service_id = %s AND kind = 'router_read' AND id > %s ORDER BY id LIMIT 1
"""

# Per device, the services that differ from their desired state: the router was last seen otherwise, or the newest
# desired state has not been applied within the grace (a job may be on its way). Every device appears (0 too).
DIVERGED_BY_DEVICE = """
SELECT d.name, count(s.service_id) FILTER (
    WHERE (s.observed_state IN ('active', 'suspended') AND s.observed_state <> s.desired_state)
       OR (s.applied_generation IS DISTINCT FROM s.desired_generation AND s.applied_state IS NOT NULL
           AND coalesce(s.desired_changed_at, s.updated_at) < clock_timestamp() - make_interval(secs => %(grace)s)))
FROM wl.devices d LEFT JOIN wl.customer_services s ON s.device_id = d.id
GROUP BY d.name
"""
