"""The pg-worker App of wl-workers: its queues, their retry policies and handlers."""

from __future__ import annotations

from pg_worker import App, RetryPolicy

from .actions import (
    ACTIVATE,
    DEACTIVATE,
    DEVICE_TEST,
    REFRESH,
    DeviceActions,
    DeviceTest,
    ServiceAction,
    ServiceRefresh,
)
from .payments import PaymentSync, PaymentSyncHandler
from .settings import DEVICE_ACTIONS, PAYMENT_SYNC, WlSettings


def build_app(conninfo: str, settings: WlSettings | None = None) -> App:
    settings = settings or WlSettings()
    app = App()
    # a job never waits for a lock (busy: retried later); it makes a few device calls per converge round
    job_timeout = 12 * (settings.http_connect_timeout + settings.http_read_timeout)
    app.queue(
        DEVICE_ACTIONS,
        visibility_timeout=30,
        job_timeout=job_timeout,
        retry=RetryPolicy(max_attempts=settings.action_max_attempts, base_delay=settings.action_base_delay, max_delay=settings.action_max_delay),
    )
    app.queue(PAYMENT_SYNC, visibility_timeout=30, job_timeout=60, retry=RetryPolicy(max_attempts=settings.payment_max_attempts, base_delay=settings.payment_base_delay, max_delay=600.0))
    actions = DeviceActions(conninfo, settings)
    app.add_handler(DEVICE_ACTIONS, actions.handle, type=ACTIVATE, schema=ServiceAction)
    app.add_handler(DEVICE_ACTIONS, actions.handle, type=DEACTIVATE, schema=ServiceAction)
    app.add_handler(DEVICE_ACTIONS, actions.refresh, type=REFRESH, schema=ServiceRefresh)
    app.add_handler(DEVICE_ACTIONS, actions.device_test, type=DEVICE_TEST, schema=DeviceTest)
    app.add_handler(PAYMENT_SYNC, PaymentSyncHandler(conninfo, settings).handle, type="payments.sync", schema=PaymentSync)
    return app
