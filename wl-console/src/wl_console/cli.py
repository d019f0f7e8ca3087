"""``wl-console``: ``serve`` the console, ``migrate`` its schema, manage operator accounts (``user``).

Every ``serve`` flag mirrors a ``WL_CONSOLE_*`` variable (``--help`` names it); flags win over the environment.
Passwords are read from a prompt (twice) or, for scripts, from standard input (``--password-stdin``): never from
the command line, where ``ps`` and shell history would show them.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from pydantic import ValidationError

from .accounts import AccountError, add_user, list_users, set_disabled, set_password, set_role
from .permissions import ROLES
from .settings import ConsoleSettings

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _settings(overrides: dict[str, Any] | None = None) -> ConsoleSettings:
    try:
        return ConsoleSettings(**{k: v for k, v in (overrides or {}).items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_input=False))
        raise SystemExit(f"wl-console: bad settings: {problems}") from None


def _database(settings: ConsoleSettings) -> str:
    if not settings.database_url:
        raise SystemExit("wl-console: set DATABASE_URL (or WL_CONSOLE_DATABASE_URL)")
    return settings.database_url


def _configure_logging(settings: ConsoleSettings) -> None:
    from pg_worker.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_format)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = _settings({"host": args.host, "port": args.port})
    _configure_logging(settings)
    try:
        app = create_app(settings, conninfo=_database(settings))
    except ValueError as exc:
        raise SystemExit(f"wl-console: {exc}") from None
    # Behind a TLS-terminating proxy, set FORWARDED_ALLOW_IPS to its address so the client address and scheme are right.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False, server_header=False,
                            proxy_headers=True, forwarded_allow_ips=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"))
    uvicorn.Server(config).run()
    return EXIT_OK


def _migrate(_args: argparse.Namespace) -> int:
    from ._migrate import MigrationError, migrate

    settings = _settings()
    _configure_logging(settings)
    try:
        report = asyncio.run(migrate(_database(settings)))
    except MigrationError as exc:
        print(f"wl-console: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"schema console at version {report.current} (applied: {', '.join(report.applied) or 'none'}); "
          f"search indexes: {', '.join(report.indexes) or 'none'}")
    for skipped in report.indexes_skipped:
        print(f"  not yet: {skipped}")
    return EXIT_OK


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("new password: ")
    if getpass.getpass("again: ") != first:
        raise AccountError("the two passwords differ")
    return first


def _os_user() -> str:
    try:
        return "cli:" + getpass.getuser()
    except (KeyError, OSError):
        return "cli:unknown"


async def _user(args: argparse.Namespace, url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10) as conn:
        actor = _os_user()
        handlers: dict[str, Callable[[], Awaitable[str]]] = {
            "add": lambda: _then(add_user(conn, args.username, args.role, _read_password(args), actor=actor), f"user {args.username} ({args.role}) added"),
            "passwd": lambda: _then(set_password(conn, args.username, _read_password(args), actor=actor), f"password of {args.username} changed; its sessions ended"),
            "disable": lambda: _then(set_disabled(conn, args.username, True, actor=actor), f"user {args.username} disabled; its sessions ended"),
            "enable": lambda: _then(set_disabled(conn, args.username, False, actor=actor), f"user {args.username} enabled"),
            "role": lambda: _then(set_role(conn, args.username, args.role, actor=actor), f"user {args.username} is now {args.role}"),
        }
        if args.sub == "list":
            for user in await list_users(conn):
                print(f"{user['username']:<24} {user['role']:<9} {'disabled' if user['disabled'] else 'enabled':<9} since {user['created_at']:%Y-%m-%d}")
            return EXIT_OK
        print(await handlers[args.sub]())
    return EXIT_OK


async def _then(work: Awaitable[Any], text: str) -> str:
    await work
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wl-console", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the console (DATABASE_URL, WL_CONSOLE_SECRET_KEY)")
    serve.add_argument("--host", default=None, help="listen address (env WL_CONSOLE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="listen port (env WL_CONSOLE_PORT, default 8090)")
    serve.set_defaults(func=_serve)
    sub.add_parser("migrate", help="create/upgrade the console schema and its search indexes (DATABASE_URL)").set_defaults(func=_migrate)
    user = sub.add_parser("user", help="operator accounts").add_subparsers(dest="sub", required=True, metavar="ACTION")
    add = user.add_parser("add", help="add a user (password prompted, or --password-stdin)")
    add.add_argument("username")
    add.add_argument("--role", choices=ROLES, required=True, help="viewer: reads; operator: + actions and replays; admin: + purges")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of standard input")
    passwd = user.add_parser("passwd", help="set a new password (ends the user's sessions)")
    passwd.add_argument("username")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from the first line of standard input")
    user.add_parser("disable", help="disable a user (ends the user's sessions)").add_argument("username")
    user.add_parser("enable", help="enable a disabled user").add_argument("username")
    role = user.add_parser("role", help="change a user's role")
    role.add_argument("username")
    role.add_argument("role", choices=ROLES)
    user.add_parser("list", help="list users")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "user":
            settings = _settings()
            return asyncio.run(_user(args, _database(settings)))
        result: int = args.func(args)
        return result
    except AccountError as exc:
        print(f"wl-console: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except psycopg.Error as exc:
        print(f"wl-console: database error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE


def entrypoint() -> None:
    sys.exit(main())
