#!/bin/sh
# Brings wg0 up from the mounted config, then stays while the interface lives; SIGTERM takes it down.
# Exits non-zero when the interface disappears (e.g. wireguard-go died), so the restart policy brings it back.
set -eu
CONFIG="${WG_CONFIG:-/run/secrets/wg0.conf}"
IFACE="${WG_INTERFACE:-wg0}"
[ -r "$CONFIG" ] || { echo "wireguard: no readable config at $CONFIG" >&2; exit 78; }
# A DNS line makes wg-quick rewrite resolv.conf and the namespace loses Docker's resolver (no more "postgres").
if grep -Eiq '^[[:space:]]*DNS[[:space:]]*=' "$CONFIG"; then
    echo "wireguard: remove the 'DNS =' line from $CONFIG (it would replace Docker's resolver)" >&2
    exit 78
fi
mkdir -p /etc/wireguard
install -m 600 "$CONFIG" "/etc/wireguard/$IFACE.conf"
# The namespace belongs to the netns-owner container and outlives us: a kernel interface from our previous run
# may still be there.
ip link show "$IFACE" >/dev/null 2>&1 && ip link delete "$IFACE"
wg-quick up "$IFACE"
trap 'wg-quick down "$IFACE"; exit 0' TERM INT
while ip link show "$IFACE" >/dev/null 2>&1; do
    sleep 5 &
    wait $! || true
done
echo "wireguard: $IFACE is gone, exiting so that the restart policy starts it again" >&2
exit 1
