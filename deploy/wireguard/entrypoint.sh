#!/bin/sh
# Brings the tunnel up from the mounted config, then stays while the interface lives; SIGTERM takes it down.
# Exits non-zero when the interface disappears (e.g. wireguard-go died), so the restart policy brings it back.
# Settings (all optional): WG_CONFIG (the config file), WG_INTERFACE (wg0), WG_RUN_DIR (/etc/wireguard).
set -eu
CONFIG="${WG_CONFIG:-/run/secrets/wg0.conf}"
IFACE="${WG_INTERFACE:-wg0}"
RUN_DIR="${WG_RUN_DIR:-/etc/wireguard}"
# Metric of the fallback routes below; wg-quick's own routes (metric 0) win while the tunnel is up.
FALLBACK_METRIC=4242
[ -r "$CONFIG" ] || { echo "wireguard: no readable config at $CONFIG" >&2; exit 78; }
# A DNS line makes wg-quick rewrite resolv.conf and the namespace loses Docker's resolver (no more "postgres").
if grep -Eiq '^[[:space:]]*DNS[[:space:]]*=' "$CONFIG"; then
    echo "wireguard: remove the 'DNS =' line from $CONFIG (it would replace Docker's resolver)" >&2
    exit 78
fi
mkdir -p "$RUN_DIR"
install -m 600 "$CONFIG" "$RUN_DIR/$IFACE.conf"
# The namespace belongs to the netns-owner container and outlives us: a kernel interface from our previous run
# may still be there.
if ip link show "$IFACE" >/dev/null 2>&1; then ip link delete "$IFACE"; fi
wg-quick up "$RUN_DIR/$IFACE.conf"
# Without wg0 the device subnets would follow the default route out of the compose network. An "unreachable"
# route per AllowedIPs range, which stays in the shared namespace when we are gone, makes such packets fail at
# once (EHOSTUNREACH) instead of leaving through the wrong door.
for cidr in $(wg show "$IFACE" allowed-ips | cut -f2- | tr ' ' '\n' | grep -v '^(none)$' | grep -v ':' || true); do
    ip route replace unreachable "$cidr" metric "$FALLBACK_METRIC"
done
trap 'wg-quick down "$RUN_DIR/$IFACE.conf"; exit 0' TERM INT
while ip link show "$IFACE" >/dev/null 2>&1; do
    sleep 2 &
    wait $! || true
done
echo "wireguard: $IFACE is gone, exiting so that the restart policy starts it again" >&2
exit 1
