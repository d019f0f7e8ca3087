"""Metrics, health endpoints and structured logs of a running worker."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import pg_worker
from conftest import PgServer
from helpers import RecordingObserver, running_worker, wait_until
from pg_worker import App, Job, PermanentFailure, PollSchedule, Producer, RetryPolicy, WakeupSource
from pg_worker.health import HealthProbe
from pg_worker.metrics import instrument
from pg_worker.observability import ObservabilityServer


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


async def get(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(_get, port, path)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


_observers: dict[int, RecordingObserver] = {}


@asynccontextmanager
async def observed_worker(app: App, url: str, **settings: Any) -> AsyncIterator[tuple[pg_worker.Worker, int]]:
    settings.setdefault("poll", PollSchedule(interval=600))
    observer = RecordingObserver()
    async with running_worker(app, url, observer, **settings) as worker:
        _observers[id(worker)] = observer
        yield worker, _ports[id(worker)]


_ports: dict[int, int] = {}


@pytest.fixture(autouse=True)
def _serve_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give every worker started by running_worker() metrics and a real HTTP port (ephemeral, 127.0.0.1)."""
    original = pg_worker.Worker.run

    async def run(self: pg_worker.Worker, *, stop_when_idle: bool = False) -> None:
        metrics = instrument(self, stats_max_age=0)
        probe = HealthProbe(self, liveness_timeout=1.5, listen_grace=30, db_fresh=1.0, check_timeout=2.0)
        server = ObservabilityServer(probe, metrics, asyncio.get_running_loop(), port=0).start()
        _ports[id(self)] = server.port
        try:
            await original(self, stop_when_idle=stop_when_idle)
        finally:
            server.stop()

    monkeypatch.setattr(pg_worker.Worker, "run", run)


async def test_scraped_counters_match_what_happened(db_url: str, producer: Producer) -> None:
    app = App()
    app.queue("jobs", retry=RetryPolicy(max_attempts=3, base_delay=0.05, jitter=0))

    @app.handler("jobs")
    async def handle(job: Job[dict[str, Any]]) -> None:
        kind = job.payload.get("kind")
        if kind == "flaky" and job.attempt == 1:
            raise TimeoutError("router slow")
        if kind == "doomed":
            raise PermanentFailure("no such customer")

    await pg_worker.install(db_url, ["jobs"])
    async with observed_worker(app, db_url) as (worker, port):
        for payload in ({"kind": "ok"}, {"kind": "ok"}, {"kind": "ok"}, {"kind": "flaky"}, {"kind": "doomed"}):
            producer.enqueue("jobs", payload)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("SELECT pgmq.send('jobs', '[\"not an object\"]')")
        producer.enqueue("jobs", {"kind": "ok"}, delay=600)

        async def settled() -> bool:
            _, text = await get(port, "/metrics")
            return value(text, "pg_worker_jobs_total", queue="jobs", outcome="succeeded") == 4 and value(text, "pg_worker_jobs_total", queue="jobs", outcome="dead_lettered") == 2

        await wait_until(settled, timeout=10, what="all jobs counted")
        await asyncio.sleep(0.2)  # let the last acknowledgement land before the queue gauges are read
        status, text = await get(port, "/metrics")
    assert status == 200
    assert value(text, "pg_worker_jobs_total", queue="jobs", outcome="retried") == 1
    assert value(text, "pg_worker_job_failures_total", queue="jobs", error_type="TimeoutError") == 1
    assert value(text, "pg_worker_job_failures_total", queue="jobs", error_type="PermanentFailure") == 1
    assert value(text, "pg_worker_messages_rejected_total", queue="jobs", reason="not_an_object") == 1
    assert value(text, "pg_worker_job_duration_seconds_count", queue="jobs") == 6, "6 handler runs"
    assert value(text, "pg_worker_job_latency_seconds_count", queue="jobs") == 6
    assert value(text, "pg_worker_jobs_in_flight", queue="jobs") == 0
    observer = _observers[id(worker)]
    for source in WakeupSource:  # which wakeups happen depends on timing; their counts must match exactly
        seen = sum(1 for _, s, _ in observer.wakeups if s is source)
        assert value(text, "pg_worker_wakeups_total", queue="jobs", source=source.value) == seen, source
    assert value(text, "pg_worker_wakeups_total", queue="jobs", source="notify") >= 1
    assert value(text, "pg_worker_notifications_total", queue="jobs") == observer.notifications >= 1
    assert value(text, "pg_worker_listen_connected") == 1
    assert 0 <= value(text, "pg_worker_last_notification_age_seconds") < 30
    assert value(text, "pg_worker_queue_depth", queue="jobs") == 1, "the delayed message"
    assert value(text, "pg_worker_queue_delayed", queue="jobs") == 1
    assert value(text, "pg_worker_queue_visible_depth", queue="jobs") == 0
    assert value(text, "pg_worker_dlq_depth", queue="jobs") == 2
    assert value(text, "pg_worker_queue_oldest_message_age_seconds", queue="jobs") > 0
    assert value(text, "pg_worker_queue_depth_estimated", queue="jobs") == 0


async def test_health_endpoints_flip_when_the_database_goes_away_and_comes_back(pg_server: PgServer, db_url: str) -> None:
    app = App()
    app.add_handler("jobs", lambda job: None)
    await pg_worker.install(db_url, ["jobs"])
    async with observed_worker(app, db_url, listen_reconnect_max=0.5, db_retry_max=0.5) as (worker, port):
        assert (await get(port, "/healthz"))[0] == 200
        status, body = await get(port, "/readyz")
        assert status == 200, body
        assert json.loads(body)["status"] == "ok"

        await asyncio.to_thread(pg_server.pg_ctl, "stop", "-m", "fast", "-w")
        try:
            await wait_until(lambda: not worker.health.listening, what="listener noticed")
            status, body = await get(port, "/readyz")
            checks = {c["name"]: c for c in json.loads(body)["checks"]}
            assert status == 503
            assert checks["database"]["ok"] is False
            assert (await get(port, "/healthz"))[0] == 200, "alive: the loop still turns"
        finally:
            await asyncio.to_thread(pg_server.pg_ctl, "start", "-w", "-o", f"-h '' -k {pg_server.handle.get_postmaster_info().socket_dir}", "-l", str(pg_server.handle.log))

        async def ready() -> bool:
            return (await get(port, "/readyz"))[0] == 200

        await wait_until(ready, timeout=20, interval=0.2, what="ready again")
        _, text = await get(port, "/metrics")
        assert value(text, "pg_worker_listen_disconnects_total") >= 1
        assert sum(v for (name, _), v in samples(text).items() if name == "pg_worker_db_errors_total") >= 1


async def test_a_failing_readiness_hook_makes_the_worker_unready(db_url: str) -> None:
    app = App()
    app.add_handler("jobs", lambda job: None)
    device_network_up = True

    @app.readiness_check("device-network")
    async def devices() -> bool:
        return device_network_up

    @app.readiness_check("vpn")
    def vpn() -> bool:
        raise OSError("wg0 has no handshake")

    await pg_worker.install(db_url, ["jobs"])
    async with observed_worker(app, db_url) as (_worker, port):
        status, body = await get(port, "/readyz")
        checks = {c["name"]: c for c in json.loads(body)["checks"]}
        assert status == 503
        assert checks["device-network"] == {"name": "device-network", "ok": True, "detail": "ok"}
        assert checks["vpn"] == {"name": "vpn", "ok": False, "detail": "OSError: wg0 has no handshake"}
        device_network_up = False
        checks = {c["name"]: c for c in json.loads((await get(port, "/readyz"))[1])["checks"]}
        assert checks["device-network"]["ok"] is False
        assert (await get(port, "/healthz"))[0] == 200, "unready is not dead"


async def test_liveness_fails_while_the_event_loop_is_blocked(db_url: str, producer: Producer) -> None:
    import threading

    app = App()

    @app.handler("jobs")
    async def hog(job: Job[dict[str, Any]]) -> None:
        time.sleep(3)  # noqa: ASYNC251 - blocks the event loop on purpose: a bug only the liveness probe reveals

    await pg_worker.install(db_url, ["jobs"])
    statuses: list[int] = []
    async with observed_worker(app, db_url) as (_worker, port):
        assert (await get(port, "/healthz"))[0] == 200
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                statuses.append(_get(port, "/healthz")[0])
                time.sleep(0.1)

        prober = threading.Thread(target=probe)
        prober.start()
        producer.enqueue("jobs", {})
        await asyncio.sleep(4)
        stop.set()
        await asyncio.to_thread(prober.join)
        assert (await get(port, "/healthz"))[0] == 200, "alive again once the loop turns"
    assert 503 in statuses


async def test_unknown_paths_and_methods(db_url: str) -> None:
    app = App()
    app.add_handler("jobs", lambda job: None)
    await pg_worker.install(db_url, ["jobs"])
    async with observed_worker(app, db_url) as (_worker, port):
        assert (await get(port, "/nope"))[0] == 404
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="POST", data=b"")
        with pytest.raises(urllib.error.HTTPError) as info:
            await asyncio.to_thread(urllib.request.urlopen, request, None, 10)
        assert info.value.code == 405
        info.value.close()


REPO = Path(__file__).resolve().parents[3]
OBSERVABILITY = REPO / "deploy" / "observability"


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bpg_worker_[a-z_]+\b", text))


async def test_dashboard_and_alerts_use_only_metrics_a_worker_exports(db_url: str, producer: Producer) -> None:
    app = App()
    app.add_handler("jobs", lambda job: None)
    await pg_worker.install(db_url, ["jobs"])
    async with observed_worker(app, db_url) as (worker, port):
        producer.enqueue("jobs", {})
        await wait_until(lambda: worker.in_flight == 0, what="job done")
        _, text = await get(port, "/metrics")
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    exported = {f.name + suffix for f in text_string_to_metric_families(text) for suffix in suffixes.get(f.type, [""])}
    dashboard = json.loads((OBSERVABILITY / "grafana" / "dashboards" / "pg-worker.json").read_text())
    expressions = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    expressions += " " + dashboard["templating"]["list"][0]["query"]["query"]
    alerts = yaml.safe_load((OBSERVABILITY / "alerts.yml").read_text())
    rules = " ".join(rule["expr"] for group in alerts["groups"] for rule in group["rules"])
    used = _metric_names(expressions) | _metric_names(rules)
    assert used, "the dashboard queries pg-worker metrics"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    assert len(dashboard["panels"]) >= 10


def test_observability_profile_is_ready_to_mount() -> None:
    compose = yaml.safe_load((OBSERVABILITY / "compose.yml").read_text())
    for name in ("prometheus", "grafana"):
        service = compose["services"][name]
        assert service["profiles"] == ["observability"]
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (OBSERVABILITY / source).exists(), f"{name} mounts a missing {source}"
    assert "GF_SECURITY_ADMIN_PASSWORD" in compose["services"]["grafana"]["environment"]
    assert "${GRAFANA_ADMIN_PASSWORD" in compose["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    scrape = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["job_name"] == "pg-worker"
    assert all(t.endswith(":9480") for t in scrape["scrape_configs"][0]["static_configs"][0]["targets"])
