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

from tests.deploy.compose import ROOT, example_project, flattened, load, schema_errors
from tests.tools import require_tools

WG_EXAMPLE = ROOT / "deploy" / "wireguard" / "wg0.conf.example"
LONG_RUNNING = ("postgres", "vpn-netns", "wireguard", "wl-workers", "payment-webhook", "prometheus", "alertmanager", "grafana")
ROLE_SECRETS = ("wl_migrate", "wl_worker", "wl_webhook", "wl_console")


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


def _compose_env(project: Path) -> dict[str, str]:
    secrets = project / "secrets"
    secrets.mkdir(exist_ok=True)
    for role in ROLE_SECRETS:
        (secrets / role).write_text("not-a-real-password-0123456789\n")
    return {**os.environ, "WIREGUARD_CONFIG": str(project / "deploy" / "wireguard" / "wg0.conf"), "DB_SECRETS_DIR": str(secrets)}


def _compose_config(project: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker-compose", "--project-directory", str(project), "-f", str(project / "docker-compose.yml"), *extra, "config", "-q"],
        capture_output=True, text=True, env=_compose_env(project), cwd=project, timeout=60,
    )  # fmt: skip


def test_compose_v2_schema_accepts_both_files_and_rejects_a_broken_one() -> None:
    """The Compose Specification's schema (what Compose v2 validates with) accepts the files as written, with the
    v2-only keys 1.29 cannot check (name, depends_on restart), and refuses an unknown depends_on option."""
    for path in (ROOT / "docker-compose.yml", ROOT / "deploy" / "observability" / "compose.yml"):
        assert schema_errors(load(path)) is None, path
    broken = load()
    broken["services"]["wl-workers"]["depends_on"]["vpn-netns"]["restart_with"] = True
    assert schema_errors(broken) is not None


def test_compose_config_is_valid(tmp_path: Path) -> None:
    """Debian's docker-compose 1.29 parses and validates the model (include: merged in, examples copied)."""
    require_tools("docker-compose")
    project = example_project(tmp_path)
    env = _compose_env(project)
    for extra in ([], ["--profile", "observability"]):
        result = _compose_config(project, *extra)
        assert result.returncode == 0, result.stderr
    assert env["DB_SECRETS_DIR"]


def test_compose_config_rejects_a_broken_model(tmp_path: Path) -> None:
    """The validation above can fail: the workers given a network of their own next to network_mode is refused."""
    require_tools("docker-compose")
    project = example_project(tmp_path)
    model = load(project / "docker-compose.yml")
    model["services"]["wl-workers"]["networks"] = ["default"]
    (project / "docker-compose.yml").write_text(yaml.safe_dump(model))
    result = _compose_config(project)
    assert result.returncode != 0 and "cannot be combined" in result.stderr


def test_workers_share_the_vpn_namespace_owner(services: dict[str, Any]) -> None:
    for name, service in services.items():  # one network: the owner, postgres and Prometheus meet on it
        assert "networks" not in service, name
    owner = services["vpn-netns"]
    # the owner makes the namespace fail closed (deploy/netns/owner.sh) and is healthy only once it has
    assert owner["build"] == {"context": "deploy/netns"} and "network_mode" not in owner
    assert owner["cap_add"] == ["NET_ADMIN"] and owner["healthcheck"]["test"] == ["CMD", "/usr/local/bin/healthcheck.sh"]
    assert [s["target"] for s in owner["secrets"]] == ["wg0.conf"]  # its AllowedIPs are the device subnets
    assert "ENTRYPOINT [\"/usr/local/bin/owner.sh\"]" in (ROOT / "deploy" / "netns" / "Dockerfile").read_text()
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
    assert services["postgres"]["healthcheck"]["test"][1].startswith("pg_isready -h 127.0.0.1 ")
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    migrate = services["migrate"]["command"][-1]
    assert "pg-worker install && wl-workers migrate && python /opt/widelink/roles.py worker" in migrate
    assert "for attempt in" in migrate and "sleep 5" in migrate, "a first start on a fresh volume may need retries"
    assert "payment-webhook migrate && python /opt/widelink/roles.py webhook" in services["migrate-webhook"]["command"][-1]
    assert services["wl-workers"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["payment-webhook"]["depends_on"]["migrate-webhook"]["condition"] == "service_completed_successfully"
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


# -- issue 14 -------------------------------------------------------------------------------------------------


def test_restarting_the_namespace_owner_restarts_wireguard_and_the_workers(services: dict[str, Any]) -> None:
    """Without restart: true compose restarts neither into the owner's new namespace (the workers then ran with no
    tunnel, and wireguard stayed in the orphaned one): compose #6626, #10263."""
    assert services["wireguard"]["depends_on"]["vpn-netns"] == {"condition": "service_healthy", "restart": True}
    workers = services["wl-workers"]["depends_on"]
    assert workers["vpn-netns"] == {"condition": "service_healthy", "restart": True}
    assert workers["wireguard"] == {"condition": "service_started", "restart": True}
    assert services["wl-workers"]["environment"]["WL_REQUIRE_ROUTE_VIA"] == "wg0"


def _refers_to_webhook(service: dict[str, Any]) -> list[str]:
    text = yaml.safe_dump({k: service.get(k) for k in ("depends_on", "env_file", "secrets", "image", "build", "volumes")})
    return [word for word in ("webhook", "payment") if word in text]


def test_the_workers_do_not_depend_on_the_webhook_in_any_way(tmp_path: Path) -> None:
    """issue 14 item 6: the project without payment-webhook's services, image (Dockerfile, package), env file and
    role password is a valid compose project, and nothing the workers need refers to the webhook. The console goes
    with it (it shows the webhook's payments, so its migrate step waits for the webhook's)."""
    require_tools("docker-compose")
    project = example_project(tmp_path)
    model = load(project / "docker-compose.yml")
    for name in ("payment-webhook", "migrate-webhook", "wl-console", "migrate-console"):
        del model["services"][name]
    del model["secrets"]["wl_webhook"]
    (project / "docker-compose.yml").write_text(yaml.safe_dump(model))
    for path in project.joinpath("deploy", "env").glob("payment-webhook.env*"):
        path.unlink()
    assert not (project / "payment-webhook").exists()  # the image's sources were never copied
    result = _compose_config(project)
    assert result.returncode == 0, result.stderr
    (project / "secrets" / "wl_webhook").unlink()
    result = _compose_config(project)
    assert result.returncode == 0, result.stderr
    for name in ("postgres", "migrate", "vpn-netns", "wireguard", "wl-workers"):
        assert not _refers_to_webhook(model["services"][name]), name
    # the workers' migrate step runs only wl-workers' own image's commands and the worker role
    assert "payment-webhook" not in model["services"]["migrate"]["command"][-1]


def test_every_service_drops_capabilities_and_rotates_its_logs(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert service.get("cap_drop") == ["ALL"], f"{name}: cap_drop [ALL], then add back only what it needs"
        logging = service.get("logging") or {}
        assert logging.get("driver") == "json-file" and logging["options"]["max-size"], f"{name}: no log rotation"
    assert services["wl-workers"].get("cap_add") is None and services["payment-webhook"].get("cap_add") is None
    assert services["wireguard"]["cap_add"] == ["NET_ADMIN"]


def test_the_project_name_is_fixed() -> None:
    assert load()["name"] == "widelink"  # volumes are widelink_postgres-data whatever the checkout's folder


def test_each_service_connects_as_its_own_role_with_a_password_from_a_secret_file(services: dict[str, Any]) -> None:
    model = load()
    for role in ROLE_SECRETS:
        assert model["secrets"][role]["file"].startswith("${DB_SECRETS_DIR:?"), role
    expected = {"migrate": "wl_migrate", "migrate-webhook": "wl_migrate", "wl-workers": "wl_worker", "payment-webhook": "wl_webhook"}
    for name, role in expected.items():
        service = services[name]
        assert service["environment"]["DB_ROLE"] == role, name
        assert role in service["secrets"], name
        assert 'PGPASSWORD="$$(cat "/run/secrets/$$DB_ROLE")"' in service["entrypoint"][2], name
        granted = {s if isinstance(s, str) else s["source"] for s in service["secrets"]}
        assert granted <= {role, "wl_worker", "wl_webhook"}, f"{name} gets secrets it does not need: {granted}"
    assert services["postgres"]["environment"]["POSTGRES_USER"] == "wl_migrate"
    assert "cat /run/secrets/wl_migrate" in services["postgres"]["entrypoint"][2]
    for example in (ROOT / "deploy" / "env").glob("*.env.example"):
        for line in example.read_text().splitlines():
            if line.startswith("DATABASE_URL="):
                url = line.partition("=")[2]
                assert re.fullmatch(r"postgresql://wl_\w+@postgres:5432/widelink", url), f"{example.name}: {url}"
        assert "install -m 600" in example.read_text(), f"{example.name}: the copy must be private (mode 600)"
    assert "install -m 600" in (ROOT / ".env.example").read_text()
