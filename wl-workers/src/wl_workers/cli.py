"""The wl-workers command: migrate, run, operate devices and services, reconcile, simulate a router.

The database is DATABASE_URL (without it, an embedded PostgreSQL in WL_DATA_DIR, else PG_WORKER_DATA_DIR, as
pg-worker does). `wl-workers run` also reads pg-worker's PG_WORKER_* settings (concurrency, metrics port, ...).

Exit status: 0 done; 1 failed (database unreachable, a device could not be read, a test failed, no worker answered);
2 bad input (arguments, settings, an unknown device or service, a value the database refuses); 3 reconcile found
services it cannot check (e.g. a PPP secret missing on the router); 141 the reader of the output went away.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
from pydantic import ValidationError

from pg_worker import SetupError, WorkerCrashed, install, redact_url, resolve_database_url
from pg_worker.logging_setup import configure_logging, redact_text

from . import _operator, history, simulator
from ._migrate import MigrationError, migrate
from ._operator import OperatorError, os_user
from ._store import (
    NotFound,
    SecretUnavailable,
    add_device,
    add_service,
    get_device,
    get_service,
    list_devices,
    list_services,
    move_device,
    remove_device,
    resolve_password,
)
from .drivers import DeviceError, Timeouts, make_driver
from .locks import SessionLocks
from .netcheck import DeviceNetworkLost
from .reconcile import reconcile
from .runner import serve, worker_settings
from .settings import QUEUES, WlSettings, settings_error

logger = logging.getLogger("wl_workers.cli")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNCHECKED, EXIT_PIPE = 0, 1, 2, 3, 141

DEMO_DEVICE = "demo-router"
DEVICE_COLUMNS = ("name", "driver", "url", "username", "password_ref", "max_concurrent", "address_list")
SERVICE_COLUMNS = ("service_id", "device", "method", "target", "desired_state", "applied_state", "applied_at", "last_error")
# drivers.RouterOs: the router answered, and has no such PPP secret (a data problem of one service)
MISSING_ON_ROUTER = "has no PPP secret named"
HISTORY_COLUMNS = ("at", "kind", "state", "source", "actor", "outcome", "reason")


def _device_options(parser: argparse.ArgumentParser, *, update: bool) -> None:
    """The device fields; for ``update`` every one is optional (unset = unchanged) and has no default."""
    keep = " (unchanged if not given)" if update else ""
    parser.add_argument("--host", required=not update, help="host name or IP address, without scheme or port" + keep)
    parser.add_argument("--driver", choices=["routeros-rest", "routeros-api"], default=None if update else "routeros-rest", help="REST (v7, default) or the binary API (8728/8729, v6)" + keep)
    parser.add_argument("--port", type=int, default=None, help="default: 443/80 (REST), 8729/8728 (API)" + keep)
    parser.add_argument("--scheme", choices=["https", "http"], default=None if update else "https", help="https = TLS (default), http = plain" + keep)
    parser.add_argument("--ca-file", default=None, help="absolute path of the CA certificate(s) that sign the router's certificate" + (" ('' = the system's CAs)" if update else ""))
    parser.add_argument("--insecure", action="store_true", default=None if update else False, help="HTTPS without verifying the certificate (explicit choice)")
    if update:
        parser.add_argument("--secure", dest="insecure", action="store_false", help="verify the certificate again")
    parser.add_argument("--username", required=not update, help="the router user the worker logs in as" + keep)
    parser.add_argument("--password-ref", required=not update, help="env:VARIABLE or file:/path (the password itself is never stored)" + keep)
    parser.add_argument("--max-concurrent", type=int, default=None if update else 2, help="actions at once on this router, across all workers (default 2)" + keep)
    parser.add_argument("--address-list", default=None if update else "morosos", help="address-list of suspended customers (default morosos)" + keep)
    parser.add_argument(
        "--own-entries-only", action=argparse.BooleanOptionalAction, default=None if update else True,
        help="activate removes only the address-list entries this system created (comment 'wl-workers...'); default on" + keep,
    )  # fmt: skip


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _yes_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation (needed without a terminal)")


def build_parser() -> argparse.ArgumentParser:
    doc = (__doc__ or "").split("\n\n")
    parser = argparse.ArgumentParser(prog="wl-workers", description=doc[0], epilog=doc[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR [env: PG_WORKER_LOG_LEVEL]")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("migrate", help="apply the schema wl migrations and create the queues (safe to run concurrently)")
    commands.add_parser("run", help="run the device_actions and payment_sync worker until SIGTERM/SIGINT (PG_WORKER_* settings apply)")

    device = commands.add_parser("device", help="routers: add, list, show, update, test, remove").add_subparsers(dest="sub", required=True, metavar="ACTION")
    d_add = device.add_parser("add", help="add a router")
    d_add.add_argument("name", help="the router's name (letters, digits, . _ -)")
    _device_options(d_add, update=False)
    _json_flag(device.add_parser("list", help="list routers"))
    d_show = device.add_parser("show", help="one router (its password reference, never the password)")
    d_show.add_argument("name", help="the router")
    _json_flag(d_show)
    d_update = device.add_parser("update", help="change a router's address, credentials or limits (what is not given stays)")
    d_update.add_argument("name", help="the router")
    _device_options(d_update, update=True)
    d_test = device.add_parser("test", help="connect, log in and read the address-list: by the worker (default) or --local")
    d_test.add_argument("name", help="the router")
    d_test.add_argument("--local", action="store_true", help="test from this shell (its environment resolves the password, not the worker's)")
    d_test.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the worker's answer (default 30)")
    d_test.add_argument("--json", action="store_true", help="print JSON instead of text")
    d_remove = device.add_parser("remove", help="remove a router without services")
    d_remove.add_argument("name", help="the router")
    _yes_flag(d_remove)

    service = commands.add_parser("service", help="customer services: add, list, show, history, update, move, remove").add_subparsers(dest="sub", required=True, metavar="ACTION")
    s_add = service.add_parser("add", help="add a customer service")
    s_add.add_argument("service_id", help=f"the billing system's id (pattern {_operator.SERVICE_ID_PATTERN}, unique regardless of case)")
    s_add.add_argument("--device", required=True, help="the router that switches it")
    s_add.add_argument("--method", choices=["address-list", "pppoe"], required=True, help="how the router switches it")
    s_add.add_argument("--target", required=True, help="address-list: the customer's IPv4/IPv6 address or prefix (10.20.5.0/29, 2001:db8:5::/56); pppoe: the PPP user")
    s_add.add_argument("--desired", choices=["active", "suspended"], default="active", help="initial desired state (default active)")
    s_add.add_argument("--no-check", action="store_true", help="pppoe: do not check from this shell that the router has the PPP secret")
    s_list = service.add_parser("list", help="list services (filters combine)")
    s_list.add_argument("--device", default=None, help="only this router's services (an unknown router is an error)")
    s_list.add_argument("--state", choices=["active", "suspended"], default=None, help="only services desired in this state")
    s_list.add_argument("--diverged", action="store_true", help="only services whose applied state differs from the desired one")
    s_list.add_argument("--with-errors", action="store_true", help="only services whose last action failed")
    _json_flag(s_list)
    s_show = service.add_parser("show", help="desired vs applied vs what the device says now, and why")
    s_show.add_argument("service_id", help="the service")
    s_show.add_argument("--no-device", action="store_true", help="do not read the router")
    s_show.add_argument("--refresh", action="store_true", help="ask the worker to read the router (its password, its network) instead of this shell")
    s_show.add_argument("--timeout", type=float, default=30.0, help="with --refresh: seconds to wait for the worker (default 30)")
    _json_flag(s_show)
    s_hist = service.add_parser("history", help="what happened to a service, newest first")
    s_hist.add_argument("service_id", help="the service (also one that was removed)")
    s_hist.add_argument("--limit", type=_positive_int, default=50, help="rows to show (default 50)")
    _json_flag(s_hist)
    for name, text in (("update", "change how a service is switched (--method/--target) or its router (--device)"), ("move", "move a service to another router")):
        sub = service.add_parser(name, help=text)
        sub.add_argument("service_id", help="the service")
        sub.add_argument("--device", required=name == "move", default=None, help="the new router")
        if name == "update":
            sub.add_argument("--method", choices=["address-list", "pppoe"], default=None, help="the new method (needs --target)")
        sub.add_argument("--target", default=None, help="the new IP or PPPoE user" if name == "update" else "the target on the new router, if it differs")
        sub.add_argument("--force", action="store_true", help="also for a suspended service (its old router entry is left for you to undo)")
        sub.add_argument("--reason", default=None, help="why, for the service's history")
        sub.add_argument("--dry-run", action="store_true", help="say what would change and what would be enqueued, change nothing")
    s_remove = service.add_parser("remove", help="remove a service (its history stays)")
    s_remove.add_argument("service_id", help="the service")
    s_remove.add_argument("--force", action="store_true", help="also a suspended one (its router entry is left for you to undo)")
    s_remove.add_argument("--reason", default=None, help="why, for the service's history")
    s_remove.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    _yes_flag(s_remove)

    for name, text in (("activate", "enqueue service.activate"), ("deactivate", "enqueue service.deactivate")):
        cmd = commands.add_parser(name, help=f"{text} for a service, with event_at = now (recorded with your user name)")
        cmd.add_argument("service_id", help="the service")
        cmd.add_argument("--reason", default=None, help="why (kept in the service's history; default: 'operator <name>')")

    hist = commands.add_parser("history", help="the service history table").add_subparsers(dest="sub", required=True, metavar="ACTION")
    prune = hist.add_parser("prune", help="delete history rows older than the retention")
    prune.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="days to keep [env: WL_HISTORY_RETENTION_DAYS, default 400]")
    _yes_flag(prune)

    imp = commands.add_parser("import", help="add or update devices or services from a CSV file (all rows or none)")
    imp.add_argument("file", help="CSV with a header: devices (name,host,...) or services (service_id,device,method,target,...)")
    imp.add_argument("--dry-run", action="store_true", help="print the differences, change nothing")
    exp = commands.add_parser("export", help="write devices or services as CSV (what import reads)")
    exp.add_argument("what", choices=["devices", "services"], help="which table")
    exp.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")

    rec = commands.add_parser("reconcile", help="read every router, enqueue what differs from the desired state")
    rec.add_argument("--dry-run", action="store_true", help="print the differences, enqueue nothing")

    sim = commands.add_parser("simulate-router", help="run a RouterOS REST simulator in the foreground")
    sim.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    sim.add_argument("--port", type=_port, default=9728, help="REST port (default 9728)")
    sim.add_argument("--username", default="admin", help="the user it accepts (default admin)")
    sim.add_argument("--password-env", default="WL_SIM_PASSWORD", help="variable holding the password (default WL_SIM_PASSWORD; unset = empty)")
    sim.add_argument("--seed-demo", action="store_true", help="start with a few customers (see demo-seed)")
    sim.add_argument("--api-port", type=_port_or_any, default=None, help="also serve the binary API on this port (0 = any free one)")

    demo = commands.add_parser("demo-seed", help="add the demo router and its services (matching simulate-router --seed-demo); an existing demo router is pointed at --url")
    demo.add_argument("--url", required=True, help="the simulator, e.g. http://127.0.0.1:9728")
    demo.add_argument("--username", default="admin", help="the simulator's user (default admin)")
    demo.add_argument("--password-ref", default="env:WL_SIM_PASSWORD", help="where the worker finds its password (default env:WL_SIM_PASSWORD)")
    demo.add_argument("--if-empty", action="store_true", help="do nothing (exit 0) when the database has services on other routers")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port between 1 and 65535, got {value}")
    return value


def _port_or_any(text: str) -> int:
    return 0 if text.strip() == "0" else _port(text)


def _settings() -> WlSettings:
    return WlSettings(netcheck_targets="", netcheck_interface=None)


def _database(settings: WlSettings) -> tuple[str, Any]:
    if settings.database_url:
        from pg_worker.cli import UsageError, check_database_url

        try:
            check_database_url(settings.database_url)
        except UsageError as exc:
            raise OperatorError(str(exc)) from None
        return settings.database_url, None
    return resolve_database_url(settings.data_dir)


async def _with_conn(url: str, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[int]]) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10) as conn:
        return await work(conn)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_json_default))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S%z")
    return str(value)


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        print("  ".join(_cell(r.get(c)).ljust(widths[c]) for c in columns).rstrip())


def _confirm(args: argparse.Namespace, what: str) -> None:
    """Destructive commands: --yes, or typed agreement on a terminal; never silently without a terminal."""
    if getattr(args, "yes", False) or getattr(args, "dry_run", False):
        return
    if not sys.stdin.isatty():
        raise OperatorError(f"{what}: refusing without --yes (no terminal to ask)")
    answer = input(f"{what}? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise OperatorError(f"{what}: not confirmed, nothing changed")


def _device_row(device: Any) -> dict[str, Any]:
    row: dict[str, Any] = device.public()
    row["url"] = device.base_url
    return row


async def _device_cmd(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    if args.sub == "add":
        fields = {
            "name": args.name, "driver": args.driver, "host": args.host, "port": args.port, "scheme": args.scheme, "ca_file": args.ca_file,
            "tls_insecure": args.insecure, "username": args.username, "password_ref": args.password_ref, "max_concurrent": args.max_concurrent,
            "address_list": args.address_list, "own_entries_only": args.own_entries_only,
        }  # fmt: skip
        await add_device(conn, **_operator.device_fields(fields))
        print(f"device {args.name} added")
    elif args.sub == "list":
        rows = [_device_row(d) for d in await list_devices(conn)]
        _print_json(rows) if args.json else _print_table(rows, DEVICE_COLUMNS)
    elif args.sub == "show":
        _print_json(_device_row(await get_device(conn, args.name)))
    elif args.sub == "update":
        return await _device_update(conn, args)
    elif args.sub == "test":
        return await _device_test(conn, args)
    else:
        await get_device(conn, args.name)
        services = await list_services(conn, args.name)
        if services:
            some = ", ".join(s.service_id for s in services[:3]) + (", ..." if len(services) > 3 else "")
            raise OperatorError(
                f"device {args.name} still has {len(services)} service(s) ({some}): `wl-workers service move ID --device OTHER` or `wl-workers service remove ID` first"
            )
        _confirm(args, f"remove device {args.name}")
        await remove_device(conn, args.name)
        print(f"device {args.name} removed")
    return EXIT_OK


async def _device_update(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    changes = {
        "driver": args.driver, "host": args.host, "port": args.port, "scheme": args.scheme, "ca_file": args.ca_file, "tls_insecure": args.insecure,
        "username": args.username, "password_ref": args.password_ref, "max_concurrent": args.max_concurrent, "address_list": args.address_list,
        "own_entries_only": args.own_entries_only,
    }  # fmt: skip
    given = {k: v for k, v in changes.items() if v is not None}
    if not given:
        raise OperatorError("device update: give at least one option to change (see --help)")
    async with conn.transaction():
        before, after = await _operator.update_device(conn, args.name, given, actor=os_user())
    if not after:
        print(f"device {args.name}: nothing to change")
    for key in after:
        print(f"device {args.name}: {key} {before[key]} -> {after[key]}")
    return EXIT_OK


async def _device_test(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    if args.local:
        settings = _settings()
        result = await _operator.check_device_here(conn, args.name, connect_timeout=settings.http_connect_timeout, read_timeout=settings.http_read_timeout)
    else:
        result = await _operator.check_device_via_worker(conn, args.name, actor=os_user(), wait=args.timeout)
    if args.json:
        _print_json({"device": args.name, "ok": result.ok, "message": result.message, "tested_by": result.by})
    else:
        print(f"device {args.name}: {'ok' if result.ok else 'FAILED'} (tested by {result.by}): {result.message}")
    return EXIT_OK if result.ok else EXIT_FAILURE


async def _device_now(conn: psycopg.AsyncConnection[Any], device_name: str, method: Any, target: str) -> str:
    """What the router says, read from this shell (labelled so: the worker resolves the password in its own), within
    one of the device's slots (the per-device limit covers reads)."""
    device = await get_device(conn, device_name)
    settings = _settings()
    try:
        password = resolve_password(device.password_ref)
    except SecretUnavailable as exc:
        return f"unknown (not read from this shell: {exc}; the worker resolves {device.password_ref} in its own environment)"
    try:
        driver = make_driver(device, password, Timeouts(settings.http_connect_timeout, settings.http_read_timeout))
    except DeviceError as exc:
        return f"unknown ({exc}) [read from this shell]"
    locks = SessionLocks(conn)
    try:
        if not await locks.wait_for_device_slot(device, settings.device_wait) and not await locks.try_device_slot(device):
            return f"unknown (all {device.max_concurrent} slots of {device.name} busy; try again)"
        state = await driver.read_state(method, target)
        return f"{state.state} ({state.detail}) [read from this shell]"
    except DeviceError as exc:
        return f"unknown ({exc.kind}: {exc.reason}) [read from this shell]"
    finally:
        await locks.release()
        await driver.aclose()


def _matches(s: Any, args: argparse.Namespace) -> bool:
    if args.state and s.desired_state != args.state:
        return False
    # diverged: the router was last set otherwise than desired (a new service never set and desired active is not)
    if args.diverged and (s.applied_state or "active") == s.desired_state:
        return False
    return not (args.with_errors and not s.last_error)


async def _service_cmd(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    if args.sub == "add":
        await _service_add(conn, args)
    elif args.sub == "list":
        if args.device is not None:
            await get_device(conn, args.device)  # an unknown router is an error, not an empty list
        rows = [vars(s) for s in await list_services(conn, args.device) if _matches(s, args)]
        for row in rows:
            row.pop("device_id", None)
        _print_json(rows) if args.json else _print_table(rows, SERVICE_COLUMNS)
    elif args.sub == "show":
        await _service_show(conn, args)
    elif args.sub == "history":
        await get_service_or_history(conn, args.service_id)
        rows = await history.list_history(conn, args.service_id, limit=args.limit)
        _print_json(rows) if args.json else _print_table(rows, HISTORY_COLUMNS)
    else:
        return await _service_change(conn, args)
    return EXIT_OK


async def get_service_or_history(conn: psycopg.AsyncConnection[Any], service_id: str) -> None:
    """A service that exists, or existed (its history outlives it); NotFound otherwise."""
    try:
        await get_service(conn, service_id)
    except NotFound:
        if not await history.list_history(conn, service_id, limit=1):
            raise


async def _service_add(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> None:
    target = _operator.checked_target(args.method, args.target)
    await _operator.check_new_service_id(conn, args.service_id)  # (checked again below, in the transaction)
    await get_device(conn, args.device)
    if args.method == "pppoe" and not args.no_check:  # the router last: after what can be said without it
        await _check_ppp_secret(conn, args.device, target)
    async with conn.transaction():
        await _operator.add_service(conn, args.service_id, args.device, args.method, target, args.desired, actor=os_user())
    print(f"service {args.service_id} added on {args.device}")


async def _check_ppp_secret(conn: psycopg.AsyncConnection[Any], device_name: str, user: str) -> None:
    """A PPPoE service whose secret the router does not have fails every action: refuse it now. Read from this
    shell; when this shell cannot read the router (its password, its network), say so and go on."""
    now = await _device_now(conn, device_name, "pppoe", user)
    if MISSING_ON_ROUTER in now:
        raise OperatorError(f"device {device_name} has no PPP secret named {user!r} (checked from this shell; --no-check to add it anyway)")
    if now.startswith("unknown"):
        print(f"wl-workers: warning: could not check the PPP secret {user!r} on {device_name}: {now}", file=sys.stderr)


async def _service_show(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> None:
    s = await get_service(conn, args.service_id)
    why = await _operator.why(conn, s)
    if args.no_device:
        now = None
    elif args.refresh:
        now = await _operator.refresh_via_worker(conn, s, actor=os_user(), wait=args.timeout)
    else:
        now = await _device_now(conn, s.device, s.method, s.target)
    if args.json:
        row = {k: v for k, v in vars(s).items() if k != "device_id"}
        _print_json({**row, "why": why, "device_now": now})
        return
    print(f"service   {s.service_id} on {s.device} ({s.method} {s.target})")
    print(f"desired   {s.desired_state} (event at {s.desired_event_at or '-'})")
    print(f"why       {why}")
    print(f"applied   {s.applied_state or '-'} (event at {s.applied_event_at or '-'}, applied at {s.applied_at or '-'})")
    if now is not None:
        print(f"device    {now}")
    if s.last_error:
        print(f"error     {s.last_error} (at {s.last_error_at})")


async def _service_change(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    actor = os_user()
    if args.sub == "remove":
        await get_service(conn, args.service_id)
        _confirm(args, f"remove service {args.service_id}")
    tx = conn.transaction(force_rollback=args.dry_run)
    async with tx:
        if args.sub == "remove":
            change = await _operator.remove_service(conn, args.service_id, force=args.force, actor=actor, reason=args.reason)
        else:
            change = await _operator.update_service(
                conn, args.service_id, device=args.device, method=getattr(args, "method", None), target=args.target, force=args.force,
                actor=actor, reason=args.reason,
            )  # fmt: skip
    prefix = "would: " if args.dry_run else ""
    for effect in change.effects:
        print(prefix + effect)
    return EXIT_OK


async def _enqueue_cmd(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    actor = os_user()
    reason = args.reason or f"operator {args.command} ({actor})"
    msg_id = await _operator.enqueue_operator_action(conn, args.service_id, activate=args.command == "activate", reason=reason, actor=actor)
    print(f"enqueued service.{args.command} for {args.service_id} (msg_id {msg_id})")
    return EXIT_OK


async def _history_cmd(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    days = args.older_than if args.older_than is not None else _settings().history_retention_days
    if days <= 0:
        raise OperatorError(f"--older-than {days:g}: must be more than 0 days")
    _confirm(args, f"delete service history older than {days:g} days")
    removed = await history.prune(conn, days)
    print(f"removed {removed} history row(s) older than {days:g} days")
    return EXIT_OK


async def _reconcile_cmd(url: str, args: argparse.Namespace) -> int:
    # The report below says every error once; the pass's own log lines would repeat them on the same stderr.
    logging.getLogger("wl_workers.reconcile").setLevel(logging.CRITICAL + 1)
    report = await reconcile(url, _settings(), dry_run=args.dry_run)
    for d in report.differences:
        verb = ("would enqueue" if args.dry_run else "enqueued") if d.fixable else "will not fix (not our entry)"
        print(f"{d.device} {d.service_id}: desired {d.desired}, device {d.observed} ({d.detail}) -> {verb} {d.action}")
    # A device that could not be read (transient, login) fails the pass; a service the router cannot show (a PPP
    # secret that is not there) is an operator's job, not a failure of the pass.
    unchecked = [(w, r) for w, r in report.errors if MISSING_ON_ROUTER in r]
    unreadable = [(w, r) for w, r in report.errors if MISSING_ON_ROUTER not in r]
    for where, reason in report.errors:
        print(f"error {where}: {reason}", file=sys.stderr)
    print(f"checked {report.checked}, differences {len(report.differences)}, errors {len(report.errors)}")
    if report.failed_devices:
        print(f"wl-workers: devices not reconciled: {', '.join(sorted(report.failed_devices))}", file=sys.stderr)
    if unreadable:
        return EXIT_FAILURE
    return EXIT_UNCHECKED if unchecked else EXIT_OK


async def _demo_seed(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from . import _sql

    url = urlsplit(args.url)
    if not url.hostname:
        raise OperatorError(f"--url must look like http://127.0.0.1:9728, got {args.url!r}")
    cur = await conn.execute(_sql.COUNT_SERVICES_OFF_DEVICE, (DEMO_DEVICE,))
    row = await cur.fetchone()
    others = int(row[0]) if row else 0
    if others:
        if args.if_empty:
            print(f"demo data not added: the database has {others} service(s) on other routers")
            return EXIT_OK
        raise OperatorError(f"the database has {others} service(s) on other routers: demo data belongs in a database of its own")
    try:
        device = await get_device(conn, DEMO_DEVICE)
    except NotFound:
        await add_device(conn, name=DEMO_DEVICE, host=url.hostname, port=url.port, scheme=url.scheme or "http", username=args.username, password_ref=args.password_ref)
    else:
        if (device.host, device.port, device.scheme) != (url.hostname, url.port, url.scheme or "http"):
            await move_device(conn, DEMO_DEVICE, host=url.hostname, port=url.port, scheme=url.scheme or "http")
    existing = {s.service_id for s in await list_services(conn, DEMO_DEVICE)}
    for service_id, method, target, desired in simulator.DEMO_CUSTOMERS:
        if service_id not in existing:
            await add_service(conn, service_id, DEMO_DEVICE, method, target, desired)
    print(f"device {DEMO_DEVICE} ({args.url}) with services: {', '.join(c[0] for c in simulator.DEMO_CUSTOMERS)}")
    return EXIT_OK


async def _import_cmd(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    from ._bulk import import_csv

    report = await import_csv(conn, args.file, dry_run=args.dry_run, actor=os_user())
    prefix = "would " if args.dry_run else ""
    for line in report.changes:
        print(prefix + line)
    print(f"{report.kind}: {prefix}add {report.added}, {prefix}update {report.updated}, unchanged {report.unchanged}")
    return EXIT_OK


async def _export_cmd(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    from ._bulk import export_csv

    text = await export_csv(conn, args.what)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        await asyncio.to_thread(Path(args.output).write_text, text, encoding="utf-8")
    return EXIT_OK


def _simulate(args: argparse.Namespace) -> int:
    try:
        simulator.serve(args.host, args.port, args.username, os.environ.get(args.password_env, ""), seed_demo=args.seed_demo, api_port=args.api_port)
    except OSError as exc:
        raise SetupError(f"simulate-router: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return EXIT_OK


HANDLERS: dict[str, Callable[[psycopg.AsyncConnection[Any], argparse.Namespace], Awaitable[int]]] = {
    "device": _device_cmd, "service": _service_cmd, "activate": _enqueue_cmd, "deactivate": _enqueue_cmd, "demo-seed": _demo_seed,
    "history": _history_cmd, "import": _import_cmd, "export": _export_cmd,
}  # fmt: skip


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "simulate-router":
        return _simulate(args)
    # The device-network check is the worker's: a bad WL_NETCHECK_* must not stop `device list` (init arguments
    # win over the environment in pydantic-settings).
    settings = WlSettings() if args.command == "run" else _settings()
    wsettings = worker_settings() if args.command == "run" else None  # bad PG_WORKER_* said before anything starts
    url, _server = _database(settings)  # _server keeps an embedded PostgreSQL alive while in use
    if args.command == "migrate":
        report = asyncio.run(migrate(url))
        inst = asyncio.run(install(url, QUEUES))
        print(f"schema wl at version {report.current} (applied: {', '.join(report.applied) or 'none'}); queues created: {', '.join(inst.created_queues) or 'none'}")
        return EXIT_OK
    if args.command == "run":
        logger.info("database", extra={"event": "database", "url": redact_url(url)})
        assert wsettings is not None
        asyncio.run(serve(url, settings, wsettings))
        return EXIT_OK
    if args.command == "reconcile":
        return asyncio.run(_reconcile_cmd(url, args))
    return asyncio.run(_with_conn(url, lambda conn: HANDLERS[args.command](conn, args)))


# Constraint names (migrations 0001, 0005) in words; the key of the row is added by the caller's context.
CONSTRAINTS = {
    "devices_name_key": "a device with this name already exists",
    "devices_name_check": "device names are 1-63 letters, digits, . _ -, starting with a letter or digit",
    "customer_services_pkey": "a service with this id already exists",
    "customer_services_service_id_lower_idx": "a service with this id (in another case) already exists",
    "customer_services_device_id_method_target_key": "the router already switches this target for another service",
    "customer_services_device_id_fkey": "the router still has services: move or remove them first (service move / service remove)",
}


def integrity_message(exc: psycopg.errors.IntegrityError, args: argparse.Namespace) -> str:
    """One line, naming the row (device or service) and what the database refused, never its raw text."""
    key = " ".join(f"{w} {getattr(args, a)}" for w, a in (("service", "service_id"), ("device", "name")) if getattr(args, a, None))
    constraint = exc.diag.constraint_name or ""
    table = exc.diag.table_name or "row"
    words = CONSTRAINTS.get(constraint) or f"{table}: value refused by {constraint or type(exc).__name__}"
    return f"{key}: {words}" if key else words


def _pipe_closed() -> int:
    # The reader (head, less) went away: no traceback; stdout points at /dev/null so that the flush at exit is quiet.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_PIPE


def _exit_on_signal(signum: int, _frame: object) -> None:
    # The default action would end the process without atexit hooks, where an embedded server's handle is released.
    # (`run` replaces this with its graceful stop once the worker starts.)
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        configure_logging(args.log_level)
        # httpx logs every request at INFO: one line per router call is noise next to our own action events
        logging.getLogger("httpx").setLevel(logging.WARNING)
        code = _dispatch(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _pipe_closed()
    except ValidationError as exc:
        print(f"wl-workers: error: {settings_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except psycopg.errors.IntegrityError as exc:
        print(f"wl-workers: error: {integrity_message(exc, args)}", file=sys.stderr)
        return EXIT_USAGE
    except (NotFound, OperatorError, ValueError) as exc:
        print(f"wl-workers: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except (MigrationError, SetupError, WorkerCrashed, DeviceNetworkLost) as exc:
        print(f"wl-workers: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except psycopg.errors.UndefinedTable:
        print("wl-workers: the database lacks schema wl's tables: run `wl-workers migrate`", file=sys.stderr)
        return EXIT_FAILURE
    except psycopg.Error as exc:
        print(f"wl-workers: database error: {_one_line(redact_text(str(exc)))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _one_line(text: str) -> str:
    """PostgreSQL's messages carry DETAIL/HINT lines; the first line is the message."""
    return text.strip().splitlines()[0] if text.strip() else text


def entrypoint() -> None:
    sys.exit(main())
