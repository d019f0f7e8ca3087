#!/bin/sh
# The alertmanager service's entry point: writes Alertmanager's configuration from the settings in
# deploy/env/alertmanager.env (Alertmanager does not expand environment variables itself), then runs it.
# A receiver is required: without one, alerts would reach nobody, so it refuses to start instead.
#   ALERT_WEBHOOK_URL                      an HTTP(S) endpoint receiving Alertmanager's JSON (chat bridge, pager)
#   ALERT_EMAIL_TO, ALERT_SMTP_SMARTHOST (host:port), ALERT_SMTP_FROM, ALERT_SMTP_USERNAME, ALERT_SMTP_PASSWORD
# Either or both. ALERTMANAGER_CONFIG (where to write; /tmp/alertmanager.yml), RENDER_ONLY=1 (write and exit: tests).
set -eu
OUT="${ALERTMANAGER_CONFIG:-/tmp/alertmanager.yml}"
fail() { echo "alertmanager: $*" >&2; exit 78; }
for name in ALERT_WEBHOOK_URL ALERT_EMAIL_TO ALERT_SMTP_SMARTHOST ALERT_SMTP_FROM ALERT_SMTP_USERNAME ALERT_SMTP_PASSWORD; do
    eval "value=\${$name:-}"
    case "$value" in
        *'"'*|*'\'*) fail "$name must not contain a double quote or a backslash" ;;
    esac
done
webhook="${ALERT_WEBHOOK_URL:-}"
email="${ALERT_EMAIL_TO:-}"
[ -n "$webhook" ] || [ -n "$email" ] || fail "set ALERT_WEBHOOK_URL or ALERT_EMAIL_TO in deploy/env/alertmanager.env: alerts must reach someone"
case "$webhook" in ""|http://*|https://*) ;; *) fail "ALERT_WEBHOOK_URL must start with http:// or https://" ;; esac
if [ -n "$email" ]; then
    [ -n "${ALERT_SMTP_SMARTHOST:-}" ] && [ -n "${ALERT_SMTP_FROM:-}" ] || fail "e-mail needs ALERT_SMTP_SMARTHOST and ALERT_SMTP_FROM"
fi
umask 077  # the file holds the SMTP password / webhook URL
{
    echo "# written by render.sh from alertmanager.env; edit that file, not this one"
    echo "route:"
    echo "  receiver: person"
    echo "  group_by: [alertname, queue, device, instance]"
    echo "  group_wait: 30s"
    echo "  group_interval: 5m"
    echo "  repeat_interval: 4h"
    echo "  routes:"
    echo "    - matchers: ['severity=\"page\"']"
    echo "      receiver: person"
    echo "      repeat_interval: 1h"
    echo "inhibit_rules:"
    echo "  # PostgreSQL down explains the workers' and the webhook's own alerts"
    echo "  - source_matchers: ['alertname=\"PostgresDown\"']"
    echo "    target_matchers: ['alertname=~\"PgWorkerDatabaseErrors|PgWorkerListenDown|WebhookServerErrors\"']"
    echo "receivers:"
    echo "  - name: person"
    if [ -n "$webhook" ]; then
        echo "    webhook_configs:"
        echo "      - url: \"$webhook\""
        echo "        send_resolved: true"
    fi
    if [ -n "$email" ]; then
        echo "    email_configs:"
        echo "      - to: \"$email\""
        echo "        from: \"$ALERT_SMTP_FROM\""
        echo "        smarthost: \"$ALERT_SMTP_SMARTHOST\""
        if [ -n "${ALERT_SMTP_USERNAME:-}" ]; then
            echo "        auth_username: \"$ALERT_SMTP_USERNAME\""
            echo "        auth_password: \"${ALERT_SMTP_PASSWORD:-}\""
        fi
        echo "        send_resolved: true"
    fi
} > "$OUT"
[ "${RENDER_ONLY:-0}" = 1 ] && exit 0
exec /bin/alertmanager --config.file="$OUT" --storage.path=/alertmanager "$@"
