"""The real processes: ``payment-webhook serve`` and ``payment-webhook send-test-event`` talking over 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import psycopg
import pytest

from webhook_helpers import STANDARD_SECRETS, events, queue, serve_process


@pytest.mark.slow
def test_send_test_event_to_a_served_process(webhook_db: str) -> None:
    with serve_process(webhook_db) as (base_url, _proc):
        assert httpx.get(base_url + "/readyz", timeout=10).status_code == 200
        env = {**os.environ, "WEBHOOK_STANDARD_SECRETS": STANDARD_SECRETS[1]}  # the rotated-in secret
        command = [sys.executable, "-m", "payment_webhook", "send-test-event", "--url", base_url, "--service-id", "svc-cli", "--event-id", "msg_cli"]
        sent = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.startswith("200 ")
        assert json.loads(sent.stdout[4:]) == {"status": "accepted", "event_id": "msg_cli"}
        # The same event id again: a duplicate, still a success for the sender.
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and '"duplicate"' in again.stdout
        # A wrong secret: refused, and the command says so by its exit code.
        wrong = subprocess.run(
            [*command[:-2], "--event-id", "msg_wrong"],
            env={**os.environ, "WEBHOOK_STANDARD_SECRETS": "whsec_bm90LXRoZS1yaWdodC1vbmUtYnV0LWxvbmctZW5vdWdo"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert wrong.returncode == 1 and wrong.stdout.startswith("401 ")
    with psycopg.connect(webhook_db) as conn:
        assert [row[1] for row in events(conn)] == ["msg_cli"]
        [job] = queue(conn, "device_actions")
        assert (job["type"], job["service_id"]) == ("service.activate", "svc-cli")


def test_serve_refuses_to_start_without_secrets(webhook_db: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_")} | {"DATABASE_URL": webhook_db}
    result = subprocess.run([sys.executable, "-m", "payment_webhook", "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no secret configured" in result.stderr
