"""docker-compose.yml: the console (wl-console) stays on the compose network, after its one-shot migration."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.deploy.compose import ROOT, flattened


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    result: dict[str, Any] = flattened()["services"]
    return result


def test_console_stays_off_the_vpn_and_starts_after_its_migration(services: dict[str, Any]) -> None:
    console = services["wl-console"]
    assert "network_mode" not in console and "networks" not in console  # never in the VPN namespace
    assert console["ports"] and "/readyz" in " ".join(console["healthcheck"]["test"])
    assert console["restart"] == "unless-stopped"
    assert console["depends_on"]["migrate-console"]["condition"] == "service_completed_successfully"
    migrate = services["migrate-console"]
    assert "migrate" in " ".join([*migrate.get("entrypoint", []), *migrate["command"]]) and migrate["restart"] == "no"
    # its search indexes go on wl's and the webhook's tables: after their migrations
    assert migrate["depends_on"]["migrate-webhook"]["condition"] == "service_completed_successfully"


def test_console_env_file_is_not_committed() -> None:
    ignored = subprocess.run(["git", "check-ignore", "deploy/env/wl-console.env"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert ignored.stdout.strip() == "deploy/env/wl-console.env"
    assert (ROOT / "deploy" / "env" / "wl-console.env.example").is_file()
