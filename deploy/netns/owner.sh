#!/bin/sh
# The vpn-netns service: owns the network namespace that wireguard and wl-workers join, and makes it fail closed
# before either can run in it (they start only once this container is healthy, and compose restarts them with it).
#  1. An "unreachable" route per device subnet (metric 4242): while wg0 is missing (wireguard not started yet,
#     restarting, or failing on a bad key) a packet for a device address fails at once with EHOSTUNREACH instead
#     of following the default route out of the compose network, where an impostor could receive the router's
#     credentials. wg-quick's own routes (metric 0) take precedence while the tunnel is up.
#  2. A firewall: nothing arriving on wg0 reaches a socket of this namespace unless it answers a connection made
#     from here (the workers' /metrics and /readyz listen on 0.0.0.0 for Prometheus and must not answer the devices).
# Each start is a new namespace, so both are installed on every start. Settings: WG_DEVICE_SUBNETS (space or comma
# separated CIDRs; default: the AllowedIPs of WG_CONFIG), WG_CONFIG (/run/secrets/wg0.conf), WG_INTERFACE (wg0),
# WG_READY_FILE (/run/vpn-netns.ready, what the healthcheck looks for), OWNER_ONESHOT=1 (set up and exit: tests).
set -eu
CONFIG="${WG_CONFIG:-/run/secrets/wg0.conf}"
IFACE="${WG_INTERFACE:-wg0}"
READY="${WG_READY_FILE:-/run/vpn-netns.ready}"
FALLBACK_METRIC=4242
rm -f "$READY"
subnets="${WG_DEVICE_SUBNETS:-}"
if [ -z "$subnets" ]; then
    [ -r "$CONFIG" ] || { echo "vpn-netns: set WG_DEVICE_SUBNETS or give a readable $CONFIG" >&2; exit 78; }
    # AllowedIPs = a, b (possibly several lines): the ranges wg-quick will route through the tunnel
    subnets="$(sed -n 's/^[[:space:]]*[Aa]llowed[Ii][Pp]s[[:space:]]*=//p' "$CONFIG")"
fi
subnets="$(echo "$subnets" | tr ',' ' ')"
count=0
for cidr in $subnets; do
    case "$cidr" in
        0.0.0.0/0|::/0) echo "vpn-netns: refusing the default route $cidr as a device subnet" >&2; exit 78 ;;
        *:*) ip -6 route replace unreachable "$cidr" metric "$FALLBACK_METRIC" ;;
        *) ip route replace unreachable "$cidr" metric "$FALLBACK_METRIC" ;;
    esac
    count=$((count + 1))
done
[ "$count" -gt 0 ] || { echo "vpn-netns: no device subnet found (AllowedIPs in $CONFIG, or WG_DEVICE_SUBNETS)" >&2; exit 78; }
# Interface names match by name, so the rule holds for a wg0 created later (and re-created by each wireguard start).
nft -f - <<NFT
table inet vpn_netns
delete table inet vpn_netns
table inet vpn_netns {
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "$IFACE" ct state established,related accept
        iifname "$IFACE" counter drop
    }
}
NFT
echo "vpn-netns: $count device subnet(s) unreachable except through $IFACE; inbound on $IFACE dropped" >&2
: > "$READY"
[ "${OWNER_ONESHOT:-0}" = 1 ] && exit 0
# Only sleeps from here on; SIGTERM (docker stop) ends it at once.
trap 'exit 0' TERM INT
while :; do
    sleep 3600 &
    wait $! || true
done
