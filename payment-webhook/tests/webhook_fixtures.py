"""Fixtures of payment-webhook's tests (re-exported by conftest.py, so mypy can check this uniquely named module):
one embedded PostgreSQL 18 for the session, a migrated template database, a clone per test, and
the webhook app served by uvicorn on 127.0.0.1 (an ephemeral port) in a thread of the test process."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from payment_webhook import WebhookSettings, migrate
from webhook_helpers import MP_SECRETS, STANDARD_SECRETS, PgServer, RunningServer, serve

TEMPLATE = "pwh_template"


@pytest.fixture(scope="session")
def webhook_pg() -> Iterator[PgServer]:
    with PgServer.running() as server:
        server.template_database(TEMPLATE, migrate)
        yield server


@pytest.fixture
def webhook_db(webhook_pg: PgServer) -> Iterator[str]:
    """A migrated database of its own (schema webhook, pgmq, queues device_actions and payment_sync)."""
    with webhook_pg.clone(TEMPLATE, prefix="pwh") as url:
        yield url


@pytest.fixture
def blank_db(webhook_pg: PgServer) -> Iterator[str]:
    with webhook_pg.clone("template0", prefix="pwhb") as url:
        yield url


def make_settings(**overrides: object) -> WebhookSettings:
    values: dict[str, object] = {
        "standard_secrets": " ".join(STANDARD_SECRETS),
        "mercadopago_secrets": ",".join(MP_SECRETS),
        "db_timeout_seconds": 2.0,
        "pool_max_size": 10,
    }
    values.update(overrides)
    return WebhookSettings.model_validate(values)


@pytest.fixture
def webhook_server(webhook_db: str) -> Iterator[RunningServer]:
    with serve(make_settings(), webhook_db) as running:
        yield running


@pytest.fixture
def db(webhook_db: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(webhook_db, autocommit=True) as conn:
        yield conn
