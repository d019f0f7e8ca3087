-- Operator checks (issue 16): service ids unique regardless of case (CUST-1 beside cust-1 is one customer typed
-- twice), and the shapes the CLI validates for ids and hosts, enforced for rows written by any client from now on.
-- NOT VALID: rows that exist are not rechecked, so an old odd id cannot make this migration fail; a case-only
-- duplicate can, and then it names them.
DO $$
DECLARE
    duplicates text;
BEGIN
    SELECT string_agg(ids, '; ') INTO duplicates FROM (
        SELECT string_agg(service_id, ', ' ORDER BY service_id) AS ids
        FROM wl.customer_services GROUP BY lower(service_id) HAVING count(*) > 1
    ) AS d;
    IF duplicates IS NOT NULL THEN
        RAISE EXCEPTION 'service ids that differ only in case: % (rename or remove one of each, then migrate again)', duplicates;
    END IF;
END
$$;
CREATE UNIQUE INDEX customer_services_service_id_lower_idx ON wl.customer_services (lower(service_id));
ALTER TABLE wl.customer_services ADD CONSTRAINT customer_services_service_id_pattern
    CHECK (service_id ~ '^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$') NOT VALID;
ALTER TABLE wl.devices ADD CONSTRAINT devices_host_shape
    CHECK (length(host) <= 253 AND host !~ '[[:space:]/]') NOT VALID;
