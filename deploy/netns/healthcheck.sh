#!/bin/sh
# Healthy once owner.sh has installed the fallback routes and the firewall, and while the routes are still there.
set -eu
[ -e "${WG_READY_FILE:-/run/vpn-netns.ready}" ] || { echo "vpn-netns: not set up yet" >&2; exit 1; }
if [ -z "$(ip route show type unreachable; ip -6 route show type unreachable 2>/dev/null)" ]; then
    echo "vpn-netns: the device subnets' unreachable routes are gone" >&2
    exit 1
fi
