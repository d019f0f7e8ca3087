"""``payment-webhook``: ``serve`` the webhook endpoints, ``migrate`` the database, ``send-test-event``.

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


def _load_settings(overrides: dict[str, Any]) -> WebhookSettings:
    try:
        return WebhookSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{_variable(e['loc'], str(e['msg']))}: {str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors(include_input=False))
        raise SystemExit(f"payment-webhook: bad settings: {problems}") from None


def _variable(loc: tuple[int | str, ...], message: str) -> str:
    """The environment variable a settings error is about (a whole-model check has no field: told by its text)."""
    if loc:
        field = str(loc[0])
        return field if field.isupper() else f"WEBHOOK_{field.upper()}"
    if "Standard Webhooks secret" in message:
        return "WEBHOOK_STANDARD_SECRETS"
    return "WEBHOOK_*"


def _configure_logging(settings: WebhookSettings) -> None:
    from pg_worker.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_format)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ._app import create_app

    settings = _load_settings({"host": args.host, "port": args.port})
    _configure_logging(settings)
    if not settings.database_url:
        raise SystemExit("payment-webhook: set DATABASE_URL (or WEBHOOK_DATABASE_URL)")
    if not settings.standard_secret_list() and not settings.mercadopago_secret_list():
        raise SystemExit(
            "payment-webhook: no secret configured: set WEBHOOK_STANDARD_SECRETS(_FILE) and/or WEBHOOK_MERCADOPAGO_SECRETS(_FILE)"
        )
    app = create_app(settings)
    # uvicorn's own loggers go through the same JSON/console renderer; access lines are left to the proxy.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False, server_header=False)
    uvicorn.Server(config).run()
    return 0


def _migrate(_args: argparse.Namespace) -> int:
    settings = _load_settings({})
    _configure_logging(settings)
    if not settings.database_url:
        raise SystemExit("payment-webhook: set DATABASE_URL (or WEBHOOK_DATABASE_URL)")
    report = asyncio.run(_migrate_or_exit(settings.database_url))
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
    serve.set_defaults(func=_serve)
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
