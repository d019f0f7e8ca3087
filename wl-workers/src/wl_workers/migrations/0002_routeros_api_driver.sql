-- Devices may use the RouterOS binary API (8728, or 8729 with TLS when scheme = 'https').
ALTER TABLE wl.devices DROP CONSTRAINT devices_driver_check;
ALTER TABLE wl.devices ADD CONSTRAINT devices_driver_check CHECK (driver IN ('routeros-rest', 'routeros-api'));
COMMENT ON COLUMN wl.devices.scheme IS 'routeros-rest: https or http; routeros-api: https = TLS (8729), http = plain (8728)';
