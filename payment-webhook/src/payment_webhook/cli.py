"""``payment-webhook``: ``serve`` the webhook endpoints, ``migrate`` the database, ``send-test-event``, list
``events`` (``--outcome unknown_service``: what the operator must look at) and ``prune`` old ones.

Every flag mirrors a ``WEBHOOK_*`` environment variable (``--help`` names it); flags win over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from .settings import WebhookSettings

logger = logging.getLogger("payment_webhook.cli")


def _problem(loc: tuple[int | str, ...], msg: str) -> str:
    # A check across fields has no location, and its message names the variable itself.
    msg = msg.removeprefix("Value error, ")
    return f"{'.'.join(str(p) for p in loc)}: {msg}" if loc else msg


def _load_settings(overrides: dict[str, Any]) -> WebhookSettings:
    try:
        return WebhookSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(_problem(e["loc"], e["msg"]) for e in exc.errors(include_input=False))
        raise SystemExit(f"payment-webhook: bad settings: {problems}") from None


def _configure_logging(settings: WebhookSettings) -> None:
    from pg_worker.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_format)


def _serve(args: argparse.Namespace) -> int:
    from ._server import serve

    settings = _load_settings({"host": args.host, "port": args.port, "metrics_port": args.metrics_port})
    _configure_logging(settings)
    _database(settings)
    if not settings.standard_secret_list() and not settings.mercadopago_secret_list():
        raise SystemExit(
            "payment-webhook: no secret configured: set WEBHOOK_STANDARD_SECRETS(_FILE) and/or WEBHOOK_MERCADOPAGO_SECRETS(_FILE)"
        )
    asyncio.run(serve(settings))
    return 0


def _database(settings: WebhookSettings) -> str:
    if not settings.database_url:
        raise SystemExit("payment-webhook: set DATABASE_URL (or WEBHOOK_DATABASE_URL)")
    return settings.database_url


def _events(args: argparse.Namespace) -> int:
    from ._store import list_events

    settings = _load_settings({})
    _configure_logging(settings)
    rows = asyncio.run(list_events(_database(settings), outcome=args.outcome, since_seconds=args.since_days * 86400.0, limit=args.limit))
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
        return 0
    columns = ("received_at", "provider", "event_id", "type", "outcome", "service_id", "payment_id", "amount", "currency")
    print("\t".join(columns))
    for row in rows:
        print("\t".join("" if row[c] is None else str(row[c]) for c in columns))
    return 0


def _prune(args: argparse.Namespace) -> int:
    import psycopg

    from ._store import prune

    settings = _load_settings({})
    _configure_logging(settings)
    days = args.older_than_days or settings.retention_days

    async def run() -> int:
        async with await psycopg.AsyncConnection.connect(_database(settings), autocommit=True) as conn:
            return await prune(conn, older_than_days=days)

    deleted = asyncio.run(run())
    logger.info("webhook_pruned", extra={"event": "webhook_pruned", "deleted": deleted, "older_than_days": days})
    print(f"deleted {deleted} events received more than {days} days ago")
    return 0


def _migrate(_args: argparse.Namespace) -> int:
    settings = _load_settings({})
    _configure_logging(settings)
    report = asyncio.run(_migrate_or_exit(_database(settings)))
    applied = ", ".join(map(str, report.applied)) or "none"
    queues = ", ".join(report.install.created_queues) if report.install and report.install.created_queues else "none new"
    print(f"webhook schema at version {report.current} (applied now: {applied}); queues: {queues}")
    return 0


async def _migrate_or_exit(url: str) -> Any:
    """One line for a database that is down or a URL that is malformed, never a traceback (password masked)."""
    import psycopg

    from pg_worker import SetupError, redact_url
    from pg_worker.logging_setup import redact_text

    from ._migrate import migrate

    try:
        return await migrate(url)
    except psycopg.ProgrammingError as exc:
        reason = redact_text(str(exc).strip().replace(url, redact_url(url))).splitlines()[0]
        raise SystemExit(f"payment-webhook: DATABASE_URL is malformed: {reason}") from None
    except (psycopg.Error, SetupError, OSError) as exc:
        lines = redact_text(str(exc).strip().replace(url, redact_url(url))).splitlines()
        raise SystemExit(f"payment-webhook: cannot migrate {redact_url(url)}: {lines[0] if lines else type(exc).__name__}") from None


def _send_test_event(args: argparse.Namespace) -> int:
    import httpx
    from standardwebhooks import Webhook

    settings = _load_settings({})
    secrets = settings.standard_secret_list()
    if not secrets:
        raise SystemExit("payment-webhook: set WEBHOOK_STANDARD_SECRETS (or _FILE) to the billing system's whsec_ secret")
    msg_id = args.event_id or f"msg_test_{uuid.uuid4().hex}"
    now = datetime.now(UTC)
    payment_id = args.payment_id or f"test-{uuid.uuid4().hex[:12]}"
    event = {
        "type": args.type,
        "timestamp": now.isoformat(),
        "data": {"service_id": args.service_id, "payment_id": payment_id, "amount": args.amount, "currency": args.currency},
    }
    body = json.dumps(event, separators=(",", ":"))
    # The reference implementation signs: what the server accepts is what any Standard Webhooks sender produces.
    signature = Webhook(secrets[0].get_secret_value()).sign(msg_id, now, body)
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    url = args.url.rstrip("/") + "/webhooks/standard"
    try:
        response = httpx.post(url, content=body.encode(), headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"payment-webhook: could not reach {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{response.status_code} {response.text}")
    return 0 if response.is_success else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payment-webhook", description=(__doc__ or "").replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the webhook endpoints (DATABASE_URL, WEBHOOK_* secrets and limits)")
    serve.add_argument("--host", default=None, help="listen address (env WEBHOOK_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="listen port (env WEBHOOK_PORT, default 8080)")
    serve.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port only (env WEBHOOK_METRICS_PORT)")
    serve.set_defaults(func=_serve)
    events = sub.add_parser("events", help="list stored events, newest first (e.g. --outcome unknown_service) (DATABASE_URL)")
    events.add_argument(
        "--outcome", default=None, help="only this outcome: accepted, stored, ignored, unknown_service (default: all)"
    )
    events.add_argument("--since-days", type=float, default=7.0, help="received in the last N days (default 7)")
    events.add_argument("--limit", type=int, default=100, help="at most N events (default 100)")
    events.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    events.set_defaults(func=_events)
    prune_cmd = sub.add_parser("prune", help="delete events older than the retention age (DATABASE_URL, WEBHOOK_RETENTION_DAYS)")
    prune_cmd.add_argument("--older-than-days", type=int, default=None, help="age in days (env WEBHOOK_RETENTION_DAYS, default 400)")
    prune_cmd.set_defaults(func=_prune)
    migrate = sub.add_parser("migrate", help="create/upgrade the webhook schema and the queues it sends to (DATABASE_URL)")
    migrate.set_defaults(func=_migrate)
    test = sub.add_parser("send-test-event", help="send a correctly signed billing event (secret from WEBHOOK_STANDARD_SECRETS)")
    test.add_argument("--service-id", required=True, help="the customer service to switch")
    test.add_argument("--type", default="payment.approved", help="event type (default payment.approved)")
    test.add_argument("--url", default=os.environ.get("WEBHOOK_URL", "http://127.0.0.1:8080"), help="server base URL (env WEBHOOK_URL)")
    test.add_argument("--payment-id", default=None, help="payment id (default: a new test id)")
    test.add_argument("--event-id", default=None, help="webhook-id (default: a new one; repeat one to test deduplication)")
    test.add_argument("--amount", default="100.00", help="amount in the event (default 100.00)")
    test.add_argument("--currency", default="ARS", help="currency in the event (default ARS)")
    test.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)")
    test.set_defaults(func=_send_test_event)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result: int = args.func(args)
    return result


def entrypoint() -> None:
    sys.exit(main())
