"""docker-compose.yml: valid for Compose, and shaped as docs/vpn.md says (the workers inside the VPN namespace)."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.compose import ROOT, example_project, flattened, load
from tests.tools import require_tools

WG_EXAMPLE = ROOT / "deploy" / "wireguard" / "wg0.conf.example"
LONG_RUNNING = ("postgres", "vpn-netns", "wireguard", "wl-workers", "payment-webhook", "prometheus", "grafana")


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    model = flattened()
    result: dict[str, Any] = model["services"]
    return result


def _wg_example() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in WG_EXAMPLE.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values.setdefault(key.strip().lower(), []).append(value.strip())
    return values


def test_compose_config_is_valid(tmp_path: Path) -> None:
    """Debian's docker-compose 1.29 parses and validates the model (include: merged in, examples copied)."""
    require_tools("docker-compose")
    project = example_project(tmp_path)
    env = {**os.environ, "WIREGUARD_CONFIG": str(project / "deploy" / "wireguard" / "wg0.conf")}
    for extra in ([], ["--profile", "observability"]):
        result = subprocess.run(
            ["docker-compose", "--project-directory", str(project), "-f", str(project / "docker-compose.yml"),
             *extra, "config", "-q"],
            capture_output=True, text=True, env=env, cwd=project, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_compose_config_rejects_a_broken_model(tmp_path: Path) -> None:
    """The validation above can fail: the workers given a network of their own next to network_mode is refused."""
    require_tools("docker-compose")
    project = example_project(tmp_path)
    model = load(project / "docker-compose.yml")
    model["services"]["wl-workers"]["networks"] = ["default"]
    (project / "docker-compose.yml").write_text(yaml.safe_dump(model))
    env = {**os.environ, "WIREGUARD_CONFIG": str(project / "deploy" / "wireguard" / "wg0.conf")}
    result = subprocess.run(
        ["docker-compose", "--project-directory", str(project), "-f", str(project / "docker-compose.yml"), "config", "-q"],
        capture_output=True, text=True, env=env, cwd=project, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "cannot be combined" in result.stderr


def test_workers_share_the_vpn_namespace_owner(services: dict[str, Any]) -> None:
    for name, service in services.items():  # one network: the owner, postgres and Prometheus meet on it
        assert "networks" not in service, name
    owner = services["vpn-netns"]
    assert owner["command"] == ["sleep", "infinity"] and "network_mode" not in owner
    for name in ("wireguard", "wl-workers"):
        assert services[name]["network_mode"] == "service:vpn-netns", name
        for forbidden in ("networks", "ports", "hostname", "dns", "extra_hosts"):
            assert forbidden not in services[name], f"{name} must not set {forbidden} (network_mode service:...)"
    assert services["wireguard"]["cap_add"] == ["NET_ADMIN"]
    assert "/dev/net/tun:/dev/net/tun" in services["wireguard"]["devices"]
    assert "9480/readyz" in " ".join(services["wl-workers"]["healthcheck"]["test"])


def test_payment_webhook_stays_off_the_vpn(services: dict[str, Any]) -> None:
    webhook = services["payment-webhook"]
    assert "network_mode" not in webhook
    assert "networks" not in webhook  # the default network, as postgres and Prometheus
    assert webhook["ports"] and webhook["healthcheck"]


def test_prometheus_scrapes_the_workers_through_the_namespace_owner() -> None:
    scrape = yaml.safe_load((ROOT / "deploy" / "observability" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["vpn-netns:9480"]


def test_start_order_and_restart_policies(services: dict[str, Any]) -> None:
    assert services["postgres"]["healthcheck"]["test"][1].startswith("pg_isready")
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg-worker install && wl-workers migrate" in services["migrate"]["entrypoint"][-1]
    assert services["migrate-webhook"]["command"] == ["migrate"]
    for name in ("wl-workers", "payment-webhook"):
        conditions = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert conditions.get("migrate-webhook") == "service_completed_successfully", name
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
    for name in ("migrate", "migrate-webhook"):
        assert services[name]["restart"] == "no"


def test_every_image_is_pinned_and_limited(services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service["image"]
        assert re.search(r":[\w][\w.-]*$|@sha256:[0-9a-f]{64}$", image.split("/")[-1]), f"{name}: {image} is not pinned"
        assert not image.endswith((":latest", ":stable")), f"{name}: {image}"
        assert service["deploy"]["resources"]["limits"]["memory"], name
        if image.startswith("widelink/"):  # ours: built here, never pulled (a registry may hold a namesake)
            assert service["build"] and service["pull_policy"] == "build", name
    assert services["postgres"]["image"] == "ghcr.io/pgmq/pg18-pgmq:v1.13.0"


def test_compose_subnet_is_pinned_and_apart_from_the_device_subnets() -> None:
    subnets = [ipaddress.ip_network(c["subnet"]) for c in load()["networks"]["default"]["ipam"]["config"]]
    allowed = [ipaddress.ip_network(n.strip()) for n in _wg_example()["allowedips"][0].split(",")]
    assert subnets and allowed
    assert not any(s.overlaps(a) for s in subnets for a in allowed)


def test_wireguard_example_routes_only_device_subnets_and_holds_no_key() -> None:
    conf = _wg_example()
    assert "dns" not in conf, "a DNS line would replace Docker's resolver"
    for value in conf["allowedips"][0].split(","):
        network = ipaddress.ip_network(value.strip())
        assert network.prefixlen > 0, "AllowedIPs must not take the default route"
    for key in (*conf["privatekey"], *conf["publickey"]):
        assert key.startswith("REPLACE_WITH_"), "only placeholders in the committed example"
    assert not re.search(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=", WG_EXAMPLE.read_text()), "a real-looking key"


def test_secrets_come_from_uncommitted_files() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", ".env", "deploy/env/postgres.env", "deploy/env/wl-workers.env",
         "deploy/env/payment-webhook.env", "deploy/wireguard/wg0.conf"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    assert len(ignored) == 5, ignored
    model = load()
    assert model["secrets"]["wireguard-config"]["file"].startswith("${WIREGUARD_CONFIG:?")
    for name, service in model["services"].items():
        for value in (service.get("environment") or {}).values():
            assert "change-me" not in str(value), f"{name}: a secret in docker-compose.yml"
        for env_file in service.get("env_file", []):
            assert (ROOT / f"{env_file}.example").is_file(), f"{name}: {env_file}.example is missing"


def test_the_workers_self_check_watches_the_tunnel_interface(services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The interface the self-check watches is the one the wireguard service creates (named after its config),
    and the settings the compose file and the env example give wl-workers are valid."""
    from wl_workers.settings import WlSettings

    workers = services["wl-workers"]
    assert workers["restart"] == "unless-stopped"  # the self-check's exit is only a cure with a restart
    assert [s["target"] for s in services["wireguard"]["secrets"]] == ["wg0.conf"]
    for key in [k for k in os.environ if k.startswith("WL_")]:
        monkeypatch.delenv(key)
    example = (ROOT / "deploy" / "env" / "wl-workers.env.example").read_text()
    for line in example.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            monkeypatch.setenv(key, value)
    for key, value in workers["environment"].items():
        monkeypatch.setenv(key, str(value))
    config = WlSettings().netcheck()
    assert config is not None and config.interface == "wg0" and config.exit_after == 60
    assert "WL_NETCHECK_TARGETS=" in example and "WL_NETCHECK_EXIT_AFTER=" in example
