"""An example app (see pg-worker/README.md): a pretend ISP provisioning queue.

Run it yourself with ``PYTHONPATH=pg-worker/examples pg-worker run demo:app``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pydantic

from pg_worker import App, Job, PermanentFailure, RetryLater, RetryPolicy

log = logging.getLogger("demo")

app = App()
app.queue("provisioning", visibility_timeout=30, retry=RetryPolicy(max_attempts=3, base_delay=2.0))


class Activation(pydantic.BaseModel):
    customer_id: int
    device: str


@app.handler("provisioning", type="activate", schema=Activation)
def activate(job: Job[Activation]) -> None:
    """A sync handler (runs in a thread): pretend to talk to a router."""
    time.sleep(0.2)
    log.info("customer_activated", extra={"event": "customer_activated", "customer_id": job.payload.customer_id, "device": job.payload.device, "msg_id": job.msg_id})


@app.handler("provisioning", type="suspend")
async def suspend(job: Job[dict[str, Any]]) -> None:
    """An async handler whose device is busy on the first attempt: it asks to be retried."""
    if job.attempt == 1:
        raise RetryLater(2.0, "device busy, trying again in 2s")
    log.info("customer_suspended", extra={"event": "customer_suspended", "customer_id": job.payload.get("customer_id"), "attempt": job.attempt})


@app.handler("provisioning", type="terminate")
async def terminate(job: Job[dict[str, Any]]) -> None:
    raise PermanentFailure(f"customer {job.payload.get('customer_id')} has no contract: nothing to terminate")
