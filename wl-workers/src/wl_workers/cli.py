"""The ``wl-workers`` command: migrate, run, operate devices and services, reconcile, simulate a router.

The database is ``DATABASE_URL`` (without it, an embedded PostgreSQL in ``WL_DATA_DIR``, as pg-worker does).
``wl-workers run`` also reads pg-worker's ``PG_WORKER_*`` settings (concurrency, metrics port, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from pydantic import ValidationError

from pg_worker import AsyncProducer, SetupError, WorkerCrashed, install, redact_url, resolve_database_url
from pg_worker.logging_setup import configure_logging

from . import simulator
from ._migrate import MigrationError, migrate
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
from .actions import ACTIVATE, DEACTIVATE, action_message
from .drivers import DeviceError, Timeouts, make_driver
from .locks import SessionLocks
from .netcheck import DeviceNetworkLost
from .reconcile import reconcile
from .runner import serve, worker_settings
from .settings import DEVICE_ACTIONS, QUEUES, WlSettings

logger = logging.getLogger("wl_workers.cli")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

DEMO_DEVICE = "demo-router"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wl-workers", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR [env: PG_WORKER_LOG_LEVEL]")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("migrate", help="apply the schema wl migrations and create the queues (safe to run concurrently)")
    commands.add_parser("run", help="run the device_actions and payment_sync worker until SIGTERM/SIGINT (PG_WORKER_* settings apply)")

    device = commands.add_parser("device", help="routers").add_subparsers(dest="sub", required=True, metavar="ACTION")
    d_add = device.add_parser("add", help="add a router")
    d_add.add_argument("name")
    d_add.add_argument("--host", required=True)
    d_add.add_argument("--driver", choices=["routeros-rest", "routeros-api"], default="routeros-rest", help="REST (v7, default) or the binary API (8728/8729, v6)")
    d_add.add_argument("--port", type=int, default=None, help="default: 443/80 (REST), 8729/8728 (API)")
    d_add.add_argument("--scheme", choices=["https", "http"], default="https", help="https = TLS (default), http = plain")
    d_add.add_argument("--ca-file", default=None, help="CA certificate(s) that sign the router's certificate")
    d_add.add_argument("--insecure", action="store_true", help="HTTPS without verifying the certificate (explicit choice)")
    d_add.add_argument("--username", required=True)
    d_add.add_argument("--password-ref", required=True, help="env:VARIABLE or file:/path (the password itself is never stored)")
    d_add.add_argument("--max-concurrent", type=int, default=2, help="actions at once on this router, across all workers (default 2)")
    d_add.add_argument("--address-list", default="morosos", help="address-list of suspended customers (default morosos)")
    d_add.add_argument(
        "--own-entries-only", action=argparse.BooleanOptionalAction, default=True,
        help="activate removes only the address-list entries this system created (comment 'wl-workers...'); default on",
    )  # fmt: skip
    device.add_parser("list", help="list routers")
    device.add_parser("show", help="one router (its password reference, never the password)").add_argument("name")
    device.add_parser("remove", help="remove a router without services").add_argument("name")

    service = commands.add_parser("service", help="customer services").add_subparsers(dest="sub", required=True, metavar="ACTION")
    s_add = service.add_parser("add", help="add a customer service")
    s_add.add_argument("service_id")
    s_add.add_argument("--device", required=True)
    s_add.add_argument("--method", choices=["address-list", "pppoe"], required=True)
    s_add.add_argument("--target", required=True, help="address-list: the customer's IPv4/IPv6 address or prefix (10.20.5.0/29, 2001:db8:5::/56); pppoe: the PPP user")
    s_add.add_argument("--desired", choices=["active", "suspended"], default="active")
    s_list = service.add_parser("list", help="list services")
    s_list.add_argument("--device", default=None)
    service.add_parser("show", help="desired vs applied vs what the device says now").add_argument("service_id")

    for name, text in (("activate", "enqueue service.activate"), ("deactivate", "enqueue service.deactivate")):
        cmd = commands.add_parser(name, help=f"{text} for a service, with event_at = now")
        cmd.add_argument("service_id")
        cmd.add_argument("--reason", default=f"operator {name} ({os.environ.get('USER', 'unknown')})")

    rec = commands.add_parser("reconcile", help="read every router, enqueue what differs from the desired state")
    rec.add_argument("--dry-run", action="store_true", help="print the differences, enqueue nothing")

    sim = commands.add_parser("simulate-router", help="run a RouterOS REST simulator in the foreground")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8728 + 1000)
    sim.add_argument("--username", default="admin")
    sim.add_argument("--password-env", default="WL_SIM_PASSWORD", help="variable holding the password (default WL_SIM_PASSWORD; unset = empty)")
    sim.add_argument("--seed-demo", action="store_true", help="start with a few customers (see demo-seed)")
    sim.add_argument("--api-port", type=int, default=None, help="also serve the binary API on this port (0 = any free one)")

    demo = commands.add_parser("demo-seed", help="add the demo router and its services (matching simulate-router --seed-demo); an existing demo router is pointed at --url")
    demo.add_argument("--url", required=True, help="the simulator, e.g. http://127.0.0.1:9728")
    demo.add_argument("--username", default="admin")
    demo.add_argument("--password-ref", default="env:WL_SIM_PASSWORD")
    return parser


def _database(settings: WlSettings) -> tuple[str, Any]:
    if settings.database_url:
        return settings.database_url, None
    return resolve_database_url(settings.data_dir)


async def _with_conn(url: str, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[int]]) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10) as conn:
        return await work(conn)


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str("" if r.get(c) is None else r.get(c)).ljust(widths[c]) for c in columns))


async def _device_cmd(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    if args.sub == "add":
        await add_device(
            conn, name=args.name, driver=args.driver, host=args.host, port=args.port, scheme=args.scheme, ca_file=args.ca_file, tls_insecure=args.insecure,
            username=args.username, password_ref=args.password_ref, max_concurrent=args.max_concurrent, address_list=args.address_list,
            own_entries_only=args.own_entries_only,
        )
        print(f"device {args.name} added")
    elif args.sub == "list":
        devices = [d.public() for d in await list_devices(conn)]
        for d in devices:
            d["url"] = f"{d['scheme']}://{d['host']}" + (f":{d['port']}" if d["port"] else "")
        _print_table(devices, ("name", "driver", "url", "username", "password_ref", "max_concurrent", "address_list"))
    elif args.sub == "show":
        print(json.dumps((await get_device(conn, args.name)).public(), indent=2))
    else:
        await remove_device(conn, args.name)
        print(f"device {args.name} removed")
    return EXIT_OK


async def _device_now(conn: psycopg.AsyncConnection[Any], device_name: str, method: Any, target: str) -> str:
    """What the router says now, read within one of the device's slots (the per-device limit covers reads)."""
    device = await get_device(conn, device_name)
    settings = WlSettings()
    try:
        driver = make_driver(device, resolve_password(device.password_ref), Timeouts(settings.http_connect_timeout, settings.http_read_timeout))
    except (SecretUnavailable, DeviceError) as exc:
        return f"unknown ({exc})"
    locks = SessionLocks(conn)
    try:
        if not await locks.wait_for_device_slot(device, settings.device_wait) and not await locks.try_device_slot(device):
            return f"unknown (all {device.max_concurrent} slots of {device.name} busy; try again)"
        state = await driver.read_state(method, target)
        return f"{state.state} ({state.detail})"
    except DeviceError as exc:
        return f"unknown ({exc.kind}: {exc.reason})"
    finally:
        await locks.release()
        await driver.aclose()


async def _service_cmd(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    if args.sub == "add":
        await add_service(conn, args.service_id, args.device, args.method, args.target, args.desired)
        print(f"service {args.service_id} added on {args.device}")
    elif args.sub == "list":
        rows = [vars(s) for s in await list_services(conn, args.device)]
        _print_table(rows, ("service_id", "device", "method", "target", "desired_state", "applied_state", "applied_at", "last_error"))
    else:
        s = await get_service(conn, args.service_id)
        now = await _device_now(conn, s.device, s.method, s.target)
        print(f"service   {s.service_id} on {s.device} ({s.method} {s.target})")
        print(f"desired   {s.desired_state} (event at {s.desired_event_at or '-'})")
        print(f"applied   {s.applied_state or '-'} (event at {s.applied_event_at or '-'}, applied at {s.applied_at or '-'})")
        print(f"device    {now}")
        if s.last_error:
            print(f"error     {s.last_error} (at {s.last_error_at})")
    return EXIT_OK


async def _enqueue_cmd(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    await get_service(conn, args.service_id)  # refuse an unknown service here rather than dead-letter it later
    action = ACTIVATE if args.command == "activate" else DEACTIVATE
    message = action_message(action, args.service_id, datetime.now(UTC), args.reason, source="operator", actor=os.environ.get("USER") or None)
    msg_id = await AsyncProducer().enqueue(DEVICE_ACTIONS, message, conn=conn)
    print(f"enqueued {action} for {args.service_id} (msg_id {msg_id})")
    return EXIT_OK


async def _reconcile_cmd(url: str, args: argparse.Namespace) -> int:
    report = await reconcile(url, WlSettings(), dry_run=args.dry_run)
    for d in report.differences:
        verb = ("would enqueue" if args.dry_run else "enqueued") if d.fixable else "will not fix (not our entry)"
        print(f"{d.device} {d.service_id}: desired {d.desired}, device {d.observed} ({d.detail}) -> {verb} {d.action}")
    for where, reason in report.errors:
        print(f"error {where}: {reason}", file=sys.stderr)
    print(f"checked {report.checked}, differences {len(report.differences)}, errors {len(report.errors)}")
    if report.failed_devices:
        print(f"wl-workers: devices not reconciled: {', '.join(sorted(report.failed_devices))}", file=sys.stderr)
    return EXIT_FAILURE if report.errors else EXIT_OK


async def _demo_seed(conn: psycopg.AsyncConnection[Any], args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    url = urlsplit(args.url)
    if not url.hostname:
        raise ValueError(f"--url must look like http://127.0.0.1:9728, got {args.url!r}")
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


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "simulate-router":
        simulator.serve(args.host, args.port, args.username, os.environ.get(args.password_env, ""), seed_demo=args.seed_demo, api_port=args.api_port)
        return EXIT_OK
    settings = WlSettings()
    url, _server = _database(settings)  # _server keeps an embedded PostgreSQL alive while in use
    if args.command == "migrate":
        report = asyncio.run(migrate(url))
        inst = asyncio.run(install(url, QUEUES))
        print(f"schema wl at version {report.current} (applied: {', '.join(report.applied) or 'none'}); queues created: {', '.join(inst.created_queues) or 'none'}")
        return EXIT_OK
    if args.command == "run":
        logger.info("database", extra={"event": "database", "url": redact_url(url)})
        asyncio.run(serve(url, settings, worker_settings()))
        return EXIT_OK
    if args.command == "reconcile":
        return asyncio.run(_reconcile_cmd(url, args))
    handlers: dict[str, Callable[[psycopg.AsyncConnection[Any], argparse.Namespace], Awaitable[int]]] = {
        "device": _device_cmd, "service": _service_cmd, "activate": _enqueue_cmd, "deactivate": _enqueue_cmd, "demo-seed": _demo_seed,
    }
    return asyncio.run(_with_conn(url, lambda conn: handlers[args.command](conn, args)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_level)
        # httpx logs every request at INFO: one line per router call is noise next to our own action events
        logging.getLogger("httpx").setLevel(logging.WARNING)
        return _dispatch(args)
    except (NotFound, ValueError, ValidationError, psycopg.errors.IntegrityError) as exc:
        print(f"wl-workers: error: {str(exc).strip()}", file=sys.stderr)
        return EXIT_USAGE
    except (MigrationError, SetupError, WorkerCrashed, DeviceNetworkLost) as exc:
        print(f"wl-workers: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except psycopg.Error as exc:
        print(f"wl-workers: database error: {str(exc).strip()}", file=sys.stderr)
        return EXIT_FAILURE


def entrypoint() -> None:
    sys.exit(main())
