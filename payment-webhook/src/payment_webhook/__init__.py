"""payment-webhook: only genuine payment events get in, each stored once, its job enqueued in the same transaction."""

from ._app import create_app
from ._events import Event, Job, SchemaError, mercadopago_event, standard_event
from ._migrate import QUEUES, MigrationReport, migrate
from ._signatures import SignatureError, sign_mercadopago, sign_standard, verify_mercadopago, verify_standard
from .metrics import WebhookMetrics
from .settings import WebhookSettings

__all__ = [
    "QUEUES",
    "Event",
    "Job",
    "MigrationReport",
    "SchemaError",
    "SignatureError",
    "WebhookMetrics",
    "WebhookSettings",
    "create_app",
    "mercadopago_event",
    "migrate",
    "sign_mercadopago",
    "sign_standard",
    "standard_event",
    "verify_mercadopago",
    "verify_standard",
]
