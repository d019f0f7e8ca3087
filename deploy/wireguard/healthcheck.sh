#!/bin/sh
# Healthy while some peer's latest handshake is recent. WireGuard renews a session every 2 minutes while packets
# flow, and PersistentKeepalive keeps packets flowing, so an older handshake means the peer is not answering.
set -eu
IFACE="${WG_INTERFACE:-wg0}"
MAX_AGE="${WG_HANDSHAKE_MAX_AGE:-180}"
latest="$(wg show "$IFACE" latest-handshakes | awk '{ if ($2 > max) max = $2 } END { print max + 0 }')"
now="$(date +%s)"
if [ "$latest" -eq 0 ]; then
    echo "no handshake yet on $IFACE" >&2
    exit 1
fi
age=$((now - latest))
if [ "$age" -gt "$MAX_AGE" ]; then
    echo "latest handshake on $IFACE was ${age}s ago (limit ${MAX_AGE}s)" >&2
    exit 1
fi
echo "handshake ${age}s ago"
