"""issue 14 item 3: the alerting rules are valid and each one is unit-tested (promtool, from Debian's prometheus
package: scripts/ci-system-packages), Prometheus scrapes the workers and the webhook and sends to Alertmanager, and
Alertmanager's receiver is written from its env file (or it refuses to start)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.deploy.compose import ROOT, flattened
from tests.tools import require_tools

OBS = ROOT / "deploy" / "observability"
RENDER = OBS / "alertmanager" / "render.sh"


def _promtool(*args: str, cwd: Path = OBS) -> subprocess.CompletedProcess[str]:
    require_tools("promtool")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def test_rules_are_valid() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_has_a_unit_test_and_they_pass() -> None:
    result = _promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    rules = [r["alert"] for g in yaml.safe_load((OBS / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    tests = yaml.safe_load((OBS / "alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")}
    assert set(rules) <= fired, f"rules without a test that makes them fire: {set(rules) - fired}"
    for name in ("DeviceNetworkDown", "WlWorkersNotReady", "DeadLettersGrowing", "CustomersDiverged", "ReconcileFailures",
                 "WebhookRejections", "WebhookServerErrors", "PostgresDown"):  # fmt: skip
        assert name in rules, name


def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    shutil.copy(OBS / "alerts.yml", tmp_path / "alerts.yml")
    broken = (OBS / "alerts.test.yml").read_text().replace("values: '2x50'", "values: '0x50'")
    (tmp_path / "alerts.test.yml").write_text(broken)
    result = _promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "CustomersDiverged" in result.stdout + result.stderr


def test_prometheus_scrapes_workers_and_webhook_and_alerts_alertmanager(tmp_path: Path) -> None:
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {"pg-worker": ["vpn-netns:9480"], "payment-webhook": ["payment-webhook:8080"]}
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    # promtool checks the whole configuration with the rules where the container mounts them
    config["rule_files"] = [str(OBS / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    service = flattened()["services"]["alertmanager"]
    assert service["profiles"] == ["observability"] and service["env_file"] == ["deploy/env/alertmanager.env"]
    assert service["entrypoint"] == ["/bin/sh", "/etc/alertmanager/render.sh"]


def _render(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ALERT_")}
    out = tmp_path / "alertmanager.yml"
    return subprocess.run(
        ["sh", str(RENDER)], capture_output=True, text=True, timeout=30,
        env={**clean, "ALERTMANAGER_CONFIG": str(out), "RENDER_ONLY": "1", **env},
    )  # fmt: skip


def test_alertmanager_sends_to_the_webhook_or_the_mailbox_of_its_env_file(tmp_path: Path) -> None:
    result = _render(tmp_path, ALERT_WEBHOOK_URL="https://alerts.example.net/hook/x1", ALERT_EMAIL_TO="noc@example.net",
                     ALERT_SMTP_SMARTHOST="smtp.example.net:587", ALERT_SMTP_FROM="am@example.net",
                     ALERT_SMTP_USERNAME="am@example.net", ALERT_SMTP_PASSWORD="smtp-secret")  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = tmp_path / "alertmanager.yml"
    assert written.stat().st_mode & 0o077 == 0, "the rendered file holds a password: private"
    config = yaml.safe_load(written.read_text())
    (person,) = config["receivers"]
    assert person["webhook_configs"][0]["url"] == "https://alerts.example.net/hook/x1"
    mail = person["email_configs"][0]
    assert (mail["to"], mail["smarthost"], mail["auth_password"]) == ("noc@example.net", "smtp.example.net:587", "smtp-secret")
    assert config["route"]["receiver"] == "person"
    assert "smtp-secret" not in result.stderr + result.stdout


def test_alertmanager_refuses_to_start_without_a_receiver(tmp_path: Path) -> None:
    for env in ({}, {"ALERT_WEBHOOK_URL": "ftp://x"}, {"ALERT_WEBHOOK_URL": 'https://x/"y'}, {"ALERT_EMAIL_TO": "noc@example.net"}):
        result = _render(tmp_path, **env)
        assert result.returncode == 78 and re.search(r"^alertmanager: ", result.stderr), (env, result.stderr)
