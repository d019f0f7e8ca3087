"""The operator's CLI (issue 16): a history per service and the one-line "why", the whole life of services and
devices (validated, --dry-run, --yes), CSV import/export, --json and filters, and one-line errors.

Run in-process through ``main`` (fast), except where the process itself matters (a closed pipe, start-up retries).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from wl_fixtures import Cli
from wl_helpers import PASSWORD_REF, add_customer, add_router
from wl_workers import history
from wl_workers.cli import build_parser, main
from wl_workers.settings import WlSettings
from wl_workers.simulator import RouterSimulator

USER = "ana"


@pytest.fixture
def cli(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """The command run by operator ``ana`` (the actor the history records)."""
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setenv("USER", USER)
    return cli


def sql(url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def queued(url: str) -> list[dict[str, Any]]:
    return [row[0] for row in sql(url, "SELECT message FROM pgmq.q_device_actions ORDER BY msg_id")]


def one_line_error(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err and "DETAIL" not in err, err
    return err


@pytest.fixture
def setup(wl_db: str, sim: RouterSimulator) -> str:
    asyncio.run(add_router(wl_db, sim))
    asyncio.run(add_router(wl_db, sim, "r2"))
    asyncio.run(add_customer(wl_db, "c1", "address-list", "10.9.0.1"))
    return wl_db


# -- 1. history and why ---------------------------------------------------------------------------------------


def test_operator_actions_keep_who_and_why_and_show_says_why(setup: str, cli: Cli) -> None:
    url = setup
    code, out, _ = cli(url, "deactivate", "c1", "--reason", "unpaid invoice 42")
    assert code == 0
    (message,) = queued(url)
    assert {k: message[k] for k in ("type", "service_id", "reason", "source", "actor")} == {
        "type": "service.deactivate", "service_id": "c1", "reason": "unpaid invoice 42", "source": "operator", "actor": USER,
    }  # fmt: skip

    # what the worker records when it accepts a billing event (helper "wl"'s side of the contract)
    async def billing_event() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("UPDATE wl.customer_services SET desired_state = 'suspended' WHERE service_id = 'c1'")
            await conn.execute("INSERT INTO wl.service_history (service_id, at, kind, source, state) VALUES ('c1', '2026-11-29 10:00Z', 'desired_changed', 'operator', 'active')")
            await history.record(conn, "c1", "desired_changed", source="webhook", actor="billing", event_id="msg_2Xa", state="suspended", detail={"event_type": "service.suspend"})

    asyncio.run(billing_event())
    code, out, _ = cli(url, "service", "show", "c1", "--no-device")
    why = next(line for line in out.splitlines() if line.startswith("why"))
    assert "suspended since 20" in why and "by billing event msg_2Xa (service.suspend)" in why, why
    code, out, _ = cli(url, "service", "show", "c1", "--no-device", "--json")
    assert json.loads(out)["why"].startswith("suspended since") and json.loads(out)["desired_state"] == "suspended"

    code, out, _ = cli(url, "service", "history", "c1", "--json")
    rows = json.loads(out)
    assert [r["kind"] for r in rows][:2] == ["desired_changed", "desired_changed"] and rows[0]["event_id"] == "msg_2Xa", "newest first"
    assert len(json.loads(cli(url, "service", "history", "c1", "--json", "--limit", "1")[1])) == 1
    with pytest.raises(SystemExit) as exited:
        main(["service", "history", "c1", "--limit", "-1"])
    assert exited.value.code == 2
    assert cli(url, "service", "history", "nope")[0] == 2


def test_history_prune_keeps_the_retention_and_asks_first(setup: str, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    url = setup
    sql(url, "INSERT INTO wl.service_history (service_id, at, kind) VALUES ('c1', now() - interval '500 days', 'operator'), ('c1', now() - interval '10 days', 'operator')")
    code, _, err = cli(url, "history", "prune")
    assert code == 2 and "refusing without --yes" in one_line_error(err)
    code, out, _ = cli(url, "history", "prune", "--yes")
    assert code == 0 and "removed 1 history row(s) older than 400 days" in out
    monkeypatch.setenv("WL_HISTORY_RETENTION_DAYS", "5")
    assert "removed 1 " in cli(url, "history", "prune", "--yes")[1]
    assert sql(url, "SELECT count(*) FROM wl.service_history") == [(0,)]


# -- 2. the whole life from the CLI ---------------------------------------------------------------------------


def test_service_update_move_remove_with_history_dry_run_and_confirmation(setup: str, cli: Cli) -> None:
    url = setup
    code, out, _ = cli(url, "service", "update", "c1", "--target", "10.9.0.2", "--dry-run")
    assert code == 0 and "would: service c1: target 10.9.0.1 -> 10.9.0.2" in out
    assert sql(url, "SELECT target FROM wl.customer_services") == [("10.9.0.1",)], "a dry run changes nothing"
    assert cli(url, "service", "update", "c1", "--target", "10.9.0.2", "--reason", "new IP")[0] == 0
    assert cli(url, "service", "move", "c1", "--device", "r2")[0] == 0
    code, _, err = cli(url, "service", "move", "c1", "--device", "nope")
    assert code == 2 and "no device named 'nope'" in one_line_error(err)
    asyncio.run(add_customer(url, "c2", "address-list", "10.9.0.3", "r1"))
    code, _, err = cli(url, "service", "move", "c2", "--device", "r2", "--target", "10.9.0.2")
    assert code == 2 and "device r2 already switches address-list 10.9.0.2 for service 'c1'" in one_line_error(err)

    # a suspended service: refused without --force; with it, suspended again at its new place
    sql(url, "UPDATE wl.customer_services SET desired_state = 'suspended', desired_event_at = '2026-11-01Z' WHERE service_id = 'c2'")
    code, _, err = cli(url, "service", "move", "c2", "--device", "r2")
    assert code == 2 and "is suspended on device r1" in one_line_error(err)
    code, out, _ = cli(url, "service", "move", "c2", "--device", "r2", "--force")
    assert code == 0 and "stays on device r1" in out and "enqueued service.deactivate for c2 on device r2" in out
    (message,) = queued(url)
    assert message["type"] == "service.deactivate" and message["event_at"].startswith("2026-11-01"), "never outranks a newer event"

    code, _, err = cli(url, "service", "remove", "c1")
    assert code == 2 and "refusing without --yes" in one_line_error(err)
    assert cli(url, "service", "remove", "c1", "--yes", "--dry-run")[0] == 0
    assert cli(url, "service", "remove", "c1", "--yes", "--reason", "contract ended")[0] == 0
    assert cli(url, "service", "show", "c1")[0] == 2
    code, out, _ = cli(url, "service", "history", "c1", "--json")
    rows = json.loads(out)
    assert [r["kind"] for r in rows] == ["service_removed", "service_moved", "service_updated"]
    assert all(r["actor"] == USER and r["source"] == "operator" for r in rows)
    assert rows[0]["reason"] == "contract ended" and rows[1]["detail"] == {"before": {"device": "r1", "method": "address-list", "target": "10.9.0.2"}, "after": {"device": "r2", "method": "address-list", "target": "10.9.0.2"}}

    code, _, err = cli(url, "device", "remove", "r2", "--yes")
    assert code == 2 and "`wl-workers service move ID --device OTHER`" in one_line_error(err)


def test_device_update_is_validated_and_recorded(setup: str, cli: Cli, tmp_path: Path) -> None:
    url = setup
    code, out, _ = cli(url, "device", "update", "r1", "--host", "Router-1.ISP.example", "--max-concurrent", "4")
    assert code == 0 and "host 127.0.0.1 -> router-1.isp.example" in out and "max_concurrent 2 -> 4" in out
    assert "nothing to change" in cli(url, "device", "update", "r1", "--max-concurrent", "4")[1]
    code, _, err = cli(url, "device", "update", "r1", "--ca-file", str(tmp_path / "missing.pem"))
    assert code == 2 and "cannot read it" in one_line_error(err)
    (row,) = json.loads(cli(url, "service", "history", "c1", "--json")[1])
    assert row["kind"] == "service_updated" and row["reason"] == "device r1 updated" and row["detail"]["after"]["max_concurrent"] == 4


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("http://10.0.0.1:443", "bare host name or IP"),
        ("10.0.0.1 ", "spaces are not allowed"),
        ("not a host!", "spaces are not allowed"),
        ("not_a_host!", "neither a host name"),
        ("x" * 100_000, "must be 1-253 characters"),
        ("10.0.0.1:443", "give the port with --port"),
        ("", "must be 1-253"),
    ],
)
def test_device_add_refuses_hosts_that_can_never_work(wl_db: str, cli: Cli, host: str, says: str) -> None:
    code, _, err = cli(wl_db, "device", "add", "r9", "--host", host, "--username", "api", "--password-ref", PASSWORD_REF)
    assert code == 2 and says in one_line_error(err) and len(err) < 300
    assert sql(wl_db, "SELECT count(*) FROM wl.devices") == [(0,)]


def test_device_add_checks_the_ca_file_and_ids(wl_db: str, cli: Cli, tmp_path: Path) -> None:
    base = ("--username", "api", "--password-ref", PASSWORD_REF)
    code, _, err = cli(wl_db, "device", "add", "r1", "--host", "10.0.0.1", "--ca-file", "/nonexistent/ca.pem", *base)
    assert code == 2 and "--ca-file /nonexistent/ca.pem: cannot read it" in one_line_error(err)
    (tmp_path / "junk.pem").write_text("not a certificate")
    code, _, err = cli(wl_db, "device", "add", "r1", "--host", "10.0.0.1", "--ca-file", str(tmp_path / "junk.pem"), *base)
    assert code == 2 and "not a PEM file" in one_line_error(err)
    assert cli(wl_db, "device", "add", "r1", "--host", "[fd00::1]", *base)[0] == 0
    code, _, err = cli(wl_db, "device", "add", "r1", "--host", "10.0.0.2", *base)
    assert code == 2 and one_line_error(err) == "wl-workers: error: device r1: a device with this name already exists\n"
    for bad in ("cust 5001", " cust-1", "cust-\N{GRINNING FACE}", "-x"):
        code, _, err = cli(wl_db, "service", "add", "--device", "r1", "--method", "pppoe", "--target", "u1", "--", bad)
        assert code == 2 and "is not valid" in one_line_error(err), bad
    assert cli(wl_db, "service", "add", "cust-3001", "--device", "r1", "--method", "pppoe", "--target", "u1")[0] == 0
    code, _, err = cli(wl_db, "service", "add", "CUST-3001", "--device", "r1", "--method", "pppoe", "--target", "u2")
    assert code == 2 and "already exists as 'cust-3001'" in one_line_error(err)
    # the database refuses it too (migration 0005), whoever writes
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql(wl_db, "INSERT INTO wl.customer_services (service_id, device_id, method, target) SELECT 'Cust-3001', id, 'pppoe', 'u3' FROM wl.devices")
    with pytest.raises(psycopg.errors.CheckViolation):
        sql(wl_db, "INSERT INTO wl.customer_services (service_id, device_id, method, target) SELECT 'a b', id, 'pppoe', 'u3' FROM wl.devices")


def test_a_pppoe_service_needs_its_secret_on_the_router(setup: str, cli: Cli, sim: RouterSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    url = setup
    sim.add("ppp/secret", name="pppoe-7", password="x")
    code, _, err = cli(url, "service", "add", "c7", "--device", "r1", "--method", "pppoe", "--target", "pppoe-8")
    assert code == 2 and "device r1 has no PPP secret named 'pppoe-8' (checked from this shell" in one_line_error(err)
    assert cli(url, "service", "add", "c7", "--device", "r1", "--method", "pppoe", "--target", "pppoe-7")[0] == 0
    assert cli(url, "service", "add", "c8", "--device", "r1", "--method", "pppoe", "--target", "pppoe-8", "--no-check")[0] == 0
    monkeypatch.delenv("WL_TEST_ROUTER_PASSWORD")
    code, _, err = cli(url, "service", "add", "c9", "--device", "r1", "--method", "pppoe", "--target", "pppoe-9")
    assert code == 0 and "warning: could not check the PPP secret 'pppoe-9'" in err


def test_device_test_by_the_worker_or_from_this_shell(setup: str, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    url = setup
    code, out, _ = cli(url, "device", "test", "r1", "--local")
    assert code == 0 and "ok (tested by this shell)" in out and "logged in as api" in out
    monkeypatch.delenv("WL_TEST_ROUTER_PASSWORD")
    code, out, _ = cli(url, "device", "test", "r1", "--local", "--json")
    assert code == 1 and json.loads(out)["tested_by"] == "this shell" and "does not resolve in this shell" in json.loads(out)["message"]

    def worker_answers() -> None:  # the worker's side of the contract: it writes wl.device_tests
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for message in queued(url):
                if message.get("type") == "device.test":
                    sql(url, "INSERT INTO wl.device_tests (request_id, device, ok, message) VALUES (%s, %s, true, 'logged in')", (message["request_id"], message["device"]))
                    return
            time.sleep(0.05)

    answering = threading.Thread(target=worker_answers)
    answering.start()
    code, out, _ = cli(url, "device", "test", "r1", "--timeout", "20")
    answering.join()
    assert code == 0 and out == "device r1: ok (tested by worker): logged in\n"
    (message,) = [m for m in queued(url) if m["type"] == "device.test"]
    assert message["actor"] == USER and message["source"] == "operator"
    code, out, _ = cli(url, "device", "test", "r2", "--timeout", "0.3")
    assert code == 1 and "no worker answered within 0.3 s" in out


def test_service_show_can_ask_the_worker_to_read_the_router(setup: str, cli: Cli) -> None:
    url = setup

    def worker_reads() -> None:  # the worker's side of the contract: a router_read history row
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(m.get("type") == "service.refresh" for m in queued(url)):
                sql(url, "INSERT INTO wl.service_history (service_id, kind, source, state, outcome, detail) VALUES ('c1', 'router_read', 'worker', 'suspended', 'verified', %s)",
                    (json.dumps({"detail": "10.9.0.1 is in address-list morosos"}),))  # fmt: skip
                return
            time.sleep(0.05)

    reading = threading.Thread(target=worker_reads)
    reading.start()
    code, out, _ = cli(url, "service", "show", "c1", "--refresh", "--timeout", "20")
    reading.join()
    assert code == 0 and "device    suspended (10.9.0.1 is in address-list morosos) [read by the worker at " in out
    (message,) = queued(url)
    assert message == {"type": "service.refresh", "service_id": "c1", "source": "operator", "actor": USER}
    code, out, _ = cli(url, "service", "show", "c1", "--refresh", "--timeout", "0.3")
    assert "device    unknown (no worker answered within 0.3 s)" in out


# -- 3. bulk --------------------------------------------------------------------------------------------------


def test_import_is_idempotent_all_or_nothing_and_export_round_trips(setup: str, cli: Cli, tmp_path: Path) -> None:
    url = setup
    devices = tmp_path / "devices.csv"
    devices.write_text(f"name,host,port,scheme,username,password_ref\nr3,10.1.0.1,,https,api,{PASSWORD_REF}\nr1,127.0.0.1,{sql(url, 'SELECT port FROM wl.devices WHERE name = %s', ('r1',))[0][0]},http,api,{PASSWORD_REF}\n")
    code, out, _ = cli(url, "import", str(devices), "--dry-run")
    assert code == 0 and "would add device r3 (10.1.0.1)" in out and "devices: would add 1, would update 0, unchanged 1" in out
    assert sql(url, "SELECT count(*) FROM wl.devices") == [(2,)]
    assert "devices: add 1, update 0, unchanged 1" in cli(url, "import", str(devices))[1]
    assert "devices: add 0, update 0, unchanged 2" in cli(url, "import", str(devices))[1], "a second import changes nothing"

    services = tmp_path / "services.csv"
    services.write_text("service_id,device,method,target,desired_state\nc1,r1,address-list,10.9.0.1,active\nc5,r3,pppoe,pppoe-5,suspended\nc6,r3,address-list,10.9.0.6,\n")
    assert "services: add 2, update 0, unchanged 1" in cli(url, "import", str(services))[1]
    assert "services: add 0, update 0, unchanged 3" in cli(url, "import", str(services))[1]
    code, out, _ = cli(url, "export", "services")
    assert code == 0 and out.splitlines()[0] == "service_id,device,method,target,desired_state" and "c5,r3,pppoe,pppoe-5,suspended" in out
    exported = tmp_path / "exported.csv"
    assert cli(url, "export", "services", "--output", str(exported))[0] == 0
    assert "unchanged 3" in cli(url, "import", str(exported))[1]
    code, out, _ = cli(url, "export", "devices")
    assert "r3,routeros-rest,10.1.0.1,,https,,false,api," in out

    bad = tmp_path / "bad.csv"
    bad.write_text("service_id,device,method,target\nc7,r1,address-list,10.9.0.7\nc8,r1,address-list,10.9.0.8\nc9,r1,address-list,not-an-ip\n")
    code, _, err = cli(url, "import", str(bad))
    assert code == 2 and f"{bad} line 4 (service_id c9): address-list services need" in one_line_error(err)
    late = tmp_path / "late.csv"  # valid rows, refused by the database's state at row 3 (an unknown device)
    late.write_text("service_id,device,method,target\nc7,r1,address-list,10.9.0.7\nc8,nope,address-list,10.9.0.8\n")
    code, _, err = cli(url, "import", str(late))
    assert code == 2 and "line 3 (service_id c8): no device named 'nope'; nothing imported" in one_line_error(err)
    dup = tmp_path / "dup.csv"
    dup.write_text("service_id,device,method,target\nc7,r1,address-list,10.9.0.7\nC7,r1,address-list,10.9.0.8\n")
    assert "line 3 (service_id C7): the same service_id as line 2" in cli(url, "import", str(dup))[2]
    assert sql(url, "SELECT count(*) FROM wl.customer_services") == [(3,)], "nothing half imported"
    assert "missing column(s) target" in cli(url, "import", str(_write(tmp_path, "service_id,device,method\n")))[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.csv"
    path.write_text(text)
    return path


# -- 4. scriptable --------------------------------------------------------------------------------------------


def test_lists_have_json_and_filters(setup: str, cli: Cli) -> None:
    url = setup
    asyncio.run(add_customer(url, "c2", "address-list", "10.9.0.2"))
    sql(url, "UPDATE wl.customer_services SET desired_state = 'suspended', applied_state = 'active', last_error = 'transient: timeout' WHERE service_id = 'c2'")
    assert [d["name"] for d in json.loads(cli(url, "device", "list", "--json")[1])] == ["r1", "r2"]
    assert json.loads(cli(url, "device", "show", "r1")[1])["url"].startswith("http://127.0.0.1:")

    def ids(*filters: str) -> list[str]:
        code, out, _ = cli(url, "service", "list", "--json", *filters)
        assert code == 0
        return [s["service_id"] for s in json.loads(out)]

    assert ids() == ["c1", "c2"]
    assert ids("--state", "suspended") == ids("--diverged") == ids("--with-errors") == ids("--device", "r1", "--with-errors") == ["c2"]
    assert ids("--device", "r2") == []
    code, _, err = cli(url, "service", "list", "--device", "nope")
    assert code == 2 and "no device named 'nope'" in one_line_error(err)


def test_help_is_plain_text_and_every_option_is_explained() -> None:
    parser = build_parser()
    texts = [parser.format_help()]
    undocumented = []

    def walk(p: Any, path: str) -> None:
        for action in p._actions:
            if getattr(action, "choices", None) and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    texts.append(sub.format_help())
                    walk(sub, f"{path} {name}")
            elif action.help is None and action.dest != "help":
                undocumented.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(parser, "wl-workers")
    assert not undocumented, undocumented
    assert not [t for t in texts if "``" in t], "reST markup in --help"


# -- 6. errors in one line ------------------------------------------------------------------------------------


def test_bad_settings_name_the_variable_and_netcheck_settings_do_not_break_other_commands(setup: str, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    url = setup
    monkeypatch.setenv("WL_HTTP_READ_TIMEOUT", "abc")
    code, _, err = cli(url, "device", "list")
    assert code == 2 and "WL_HTTP_READ_TIMEOUT=abc: " in one_line_error(err) and "http_read_timeout" not in err
    monkeypatch.delenv("WL_HTTP_READ_TIMEOUT")
    monkeypatch.setenv("WL_NETCHECK_TARGETS", "garbage")
    assert cli(url, "device", "list")[0] == 0
    code, _, err = cli(url, "run")
    assert code == 2 and "WL_NETCHECK_TARGETS=garbage: device-network target 'garbage'" in one_line_error(err)
    monkeypatch.delenv("WL_NETCHECK_TARGETS")
    monkeypatch.setenv("PG_WORKER_CONCURRENCY", "lots")
    code, _, err = cli(url, "run")
    assert code == 2 and "PG_WORKER_CONCURRENCY=lots: " in one_line_error(err)
    monkeypatch.delenv("PG_WORKER_CONCURRENCY")
    code, _, err = cli("postgresql://u:secretpw@127.0.0.1:99999/x", "device", "list")
    assert code == 2 and "DATABASE_URL is malformed" in one_line_error(err) and "secretpw" not in err


def test_wl_workers_follows_pg_worker_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WL_DATA_DIR", raising=False)
    monkeypatch.setenv("PG_WORKER_DATA_DIR", str(tmp_path / "pg"))
    assert WlSettings().data_dir == tmp_path / "pg"
    monkeypatch.setenv("WL_DATA_DIR", str(tmp_path / "wl"))
    assert WlSettings().data_dir == tmp_path / "wl", "WL_DATA_DIR wins"


def test_reconcile_reports_each_error_once_and_a_missing_ppp_secret_is_not_a_failed_pass(setup: str, cli: Cli) -> None:
    url = setup
    asyncio.run(add_customer(url, "c3", "pppoe", "no-such-user"))
    code, out, err = cli(url, "reconcile", "--dry-run")
    assert code == 3, (out, err)
    assert err.count("no-such-user") == 1 and "Traceback" not in err


def _cli_process(url: str, *argv: str, **popen: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": url, "PG_WORKER_METRICS": "false", "PG_WORKER_LOG_FORMAT": "json"}
    return subprocess.Popen([sys.executable, "-m", "wl_workers", *argv], env=env, text=True, **popen)


def test_a_closed_pipe_is_not_an_error(setup: str) -> None:
    sql(setup, "INSERT INTO wl.customer_services (service_id, device_id, method, target) SELECT 'bulk-' || i, 1, 'pppoe', 'u' || i FROM generate_series(1, 3000) i")
    env = {**os.environ, "DATABASE_URL": setup}
    result = subprocess.run(f"{sys.executable} -m wl_workers service list | head -1", shell=True, env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("service_id") and result.stderr == "", result.stderr


def test_run_waits_for_the_database_and_warns_without_a_payment_token(wl_db: str) -> None:
    closed = "postgresql://nobody@127.0.0.1:1/x?connect_timeout=1"
    proc = _cli_process(closed, "run", stderr=subprocess.PIPE)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))  # type: ignore[union-attr]
        reader.start()
        deadline = time.monotonic() + 30
        while sum('"operation": "startup"' in line for line in lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "exited instead of retrying: " + "".join(lines)
        assert sum('"db_error"' in line for line in lines) >= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        reader.join(10)
        proc.stderr.close()  # type: ignore[union-attr]
    assert code == 128 + signal.SIGTERM, "a stop while waiting for the database is an orderly exit"
    assert not [line for line in lines if "Traceback" in line]

    proc = _cli_process(wl_db, "run", stderr=subprocess.PIPE)
    try:
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.extend(iter(proc.stderr.readline, "")))  # type: ignore[union-attr]
        reader.start()
        deadline = time.monotonic() + 30
        while not any("worker_started" in line for line in seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any("payment_sync_without_token" in line and "MERCADOPAGO_ACCESS_TOKEN" in line for line in seen), "".join(seen)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        reader.join(10)
        proc.stderr.close()  # type: ignore[union-attr]


def test_simulate_router_refuses_a_busy_or_invalid_port_in_one_line(router_password: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "wl_workers", "simulate-router", "--port", str(port)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in one_line_error(result.stderr)
    result = subprocess.run([sys.executable, "-m", "wl_workers", "simulate-router", "--port", "70000"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "between 1 and 65535" in result.stderr and "Traceback" not in result.stderr



# -- 5. safe defaults ------------------------------------------------------------------------------------------


def test_demo_seed_never_writes_into_a_database_with_real_services(setup: str, cli: Cli, sim: RouterSimulator) -> None:
    code, out, _ = cli(setup, "demo-seed", "--if-empty", "--url", sim.url)
    assert code == 0 and "demo data not added: the database has 1 service(s) on other routers" in out
    code, _, err = cli(setup, "demo-seed", "--url", sim.url)
    assert code == 2 and "demo data belongs in a database of its own" in one_line_error(err)
    assert sql(setup, "SELECT count(*) FROM wl.devices WHERE name = 'demo-router'") == [(0,)]


# -- 7. the README's blocks run ----------------------------------------------------------------------------------


def test_the_readme_simulated_router_block_runs_as_written(wl_empty_db: str) -> None:
    """The block, literally, on a fresh database, except: another port (9728 may be taken), and a longer pause
    than the README's ``sleep 1`` (the worker has just started, on a machine shared with other tests)."""
    from test_wl_processes import free_port

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("### Against a simulated router", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    port = str(free_port())
    script = block.replace("9728", port).replace("sleep 1", "sleep 3")
    wrapped = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WL_", "PG_WORKER_"))}
    env.update(DATABASE_URL=wl_empty_db, PG_WORKER_METRICS="false", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    result = subprocess.run(["bash", "-c", wrapped], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    # curl's JSON arrays (without a newline, so the next command's output follows on the same line)
    decoder, lists, at = json.JSONDecoder(), [], result.stdout.find("[")
    while at >= 0:
        value, end = decoder.raw_decode(result.stdout, at)
        lists.append(value)
        at = result.stdout.find("[", end)
    suspended, restored = lists
    assert "10.20.0.11" in {e["address"] for e in suspended} and "10.20.0.11" not in {e["address"] for e in restored}
    assert "Traceback" not in result.stderr
