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
# WireGuard resolves an Endpoint host name once, when it is set. A site whose address changes (dynamic DNS) would
# never be reached again: while a peer has had no handshake for RERESOLVE_AFTER seconds (a session is renewed
# every 2 minutes while packets flow), set its endpoint again from the config, which resolves the name anew
# (what wireguard-tools' contrib/reresolve-dns does).
RERESOLVE_AFTER="${WG_RERESOLVE_AFTER:-135}"
RERESOLVE_EVERY="${WG_RERESOLVE_EVERY:-30}"
reresolve() {
    now="$(date +%s)"
    awk '/^\[Peer\]/ { peer = 1; key = ""; ep = ""; next }
         /^\[/ { peer = 0 }
         peer && tolower($0) ~ /^[ \t]*publickey[ \t]*=/ { sub(/^[^=]*=[ \t]*/, ""); key = $0 }
         peer && tolower($0) ~ /^[ \t]*endpoint[ \t]*=/ { sub(/^[^=]*=[ \t]*/, ""); ep = $0 }
         peer && key != "" && ep != "" { print key, ep; key = ""; ep = "" }' "$RUN_DIR/$IFACE.conf" |
    while read -r key endpoint; do
        latest="$(wg show "$IFACE" latest-handshakes 2>/dev/null | awk -v k="$key" '$1 == k { print $2 }' || true)"
        if [ $((now - ${latest:-0})) -gt "$RERESOLVE_AFTER" ]; then
            wg set "$IFACE" peer "$key" endpoint "$endpoint" 2>/dev/null ||
                echo "wireguard: cannot resolve the endpoint $endpoint yet; retrying" >&2
        fi
    done
}
trap 'wg-quick down "$RUN_DIR/$IFACE.conf"; exit 0' TERM INT
ticks=0
while ip link show "$IFACE" >/dev/null 2>&1; do
    sleep 2 &
    wait $! || true
    ticks=$((ticks + 2))
    if [ "$ticks" -ge "$RERESOLVE_EVERY" ]; then
        ticks=0
        reresolve
    fi
done
echo "wireguard: $IFACE is gone, exiting so that the restart policy starts it again" >&2
exit 1
