"""The ``pg-worker`` command. Every flag mirrors an environment variable, named in its help text."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import psycopg
from pydantic import ValidationError

from ._database import redact_url, resolve_database_url
from ._install import SetupError, install
from ._names import InvalidQueueName, validate_queue_name
from ._producer import AsyncProducer
from ._schedule import InvalidSchedule
from ._worker import Worker, WorkerCrashed
from .logging_setup import configure_logging
from .settings import WorkerSettings, load_app

logger = logging.getLogger("pg_worker.cli")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the command line: printed without a traceback, exit code 2."""


def _flag(parser: argparse.ArgumentParser, *names: str, env: str, help: str, **kwargs: Any) -> None:
    parser.add_argument(*names, default=None, help=f"{help} [env: {env}]", **kwargs)


def _common(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--data-dir", env="PG_WORKER_DATA_DIR", help="embedded PostgreSQL data directory, used when DATABASE_URL is unset")
    _flag(parser, "--log-level", env="PG_WORKER_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR")
    _flag(parser, "--log-format", env="PG_WORKER_LOG_FORMAT", choices=["auto", "json", "console"], help="log output; auto = console on a terminal, else JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg-worker",
        description="A PGMQ worker. The database comes from DATABASE_URL; without it an embedded PostgreSQL 18 is started.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a worker until SIGTERM/SIGINT")
    run.add_argument("app", nargs="?", default=None, help="the App to serve, as 'module:attribute' [env: PG_WORKER_APP]")
    _flag(run, "--concurrency", env="PG_WORKER_CONCURRENCY", type=int, help="jobs run at once (default 50)")
    _flag(run, "--poll-interval", env="PG_WORKER_POLL_INTERVAL", help="fallback poll interval, e.g. 60s, 15m, or 'off' outside windows (default 60s)")
    _flag(run, "--poll-windows", env="PG_WORKER_POLL_WINDOWS", help="poll windows, e.g. '08:00-18:00 every 15m; 22:00-06:00 every 1h'")
    _flag(run, "--poll-timezone", env="PG_WORKER_POLL_TIMEZONE", help="time zone of the poll windows, e.g. America/Santiago (default UTC)")
    _flag(run, "--listen", env="PG_WORKER_LISTEN", choices=["true", "false"], help="wake on LISTEN/NOTIFY; false = poll-only (default true)")
    _flag(run, "--shutdown-grace", env="PG_WORKER_SHUTDOWN_GRACE", type=float, help="seconds in-flight jobs get to finish on SIGTERM (default 30)")
    _flag(run, "--auto-install", env="PG_WORKER_AUTO_INSTALL", choices=["true", "false"], help="create missing queues/triggers at start-up (default true)")
    _flag(run, "--worker-id", env="PG_WORKER_WORKER_ID", help="stable worker name (default host-pid-random)")
    _common(run)

    inst = commands.add_parser("install", help="install pgmq, pg-worker's schema, the queues and their wakeup triggers")
    inst.add_argument("app", nargs="?", default=None, help="take the queues from this App ('module:attribute') [env: PG_WORKER_APP]")
    inst.add_argument("--queue", action="append", default=[], help="a queue to create (repeatable)")
    _common(inst)

    send = commands.add_parser("send", help="send one job")
    send.add_argument("queue", help="queue name")
    send.add_argument("payload", help="the job as a JSON object, e.g. '{\"customer_id\": 42}'")
    send.add_argument("--delay", type=float, default=None, help="seconds before the job becomes visible")
    send.add_argument("--type", dest="job_type", default=None, help="set the message's 'type' field")
    _common(send)
    return parser


def _settings(args: argparse.Namespace) -> WorkerSettings:
    overrides: dict[str, Any] = {}
    for field in ("app", "concurrency", "poll_interval", "poll_windows", "poll_timezone", "shutdown_grace", "worker_id", "data_dir", "log_level", "log_format"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    for field in ("listen", "auto_install"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value == "true"
    return WorkerSettings(**overrides)


def _database(settings: WorkerSettings) -> tuple[str, Any]:
    if settings.database_url:
        return settings.database_url, None
    return resolve_database_url(settings.data_dir)


async def _serve(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    seen = 0

    def on_signal(signum: int) -> None:
        nonlocal seen
        seen += 1
        name = signal.Signals(signum).name
        if seen == 1:
            logger.info("shutdown_requested", extra={"event": "shutdown_requested", "signal": name, "grace_s": worker.config.shutdown_grace})
            worker.request_stop()
        else:
            logger.warning("shutdown_forced", extra={"event": "shutdown_forced", "signal": name, "in_flight": worker.in_flight})
            logging.shutdown()
            os._exit(EXIT_FAILURE)  # unfinished messages come back after their visibility timeout

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await worker.run()


def _cmd_run(args: argparse.Namespace, settings: WorkerSettings) -> int:
    if not settings.app:
        raise UsageError("no app given: pass 'module:attribute' or set PG_WORKER_APP")
    app = load_app(settings.app)
    config = settings.worker_config()
    url, _server = _database(settings)
    logger.info("database", extra={"event": "database", "url": redact_url(url), "embedded": _server is not None})
    worker = Worker(app, url, config, listen_conninfo=settings.listen_url)
    asyncio.run(_serve(worker))
    if worker.sync_jobs_running:
        # Their messages were handed back already; Python would otherwise wait for these threads at exit.
        logger.warning("sync_jobs_abandoned", extra={"event": "sync_jobs_abandoned", "threads": worker.sync_jobs_running})
        if _server is not None:
            _server.cleanup()
        logging.shutdown()
        os._exit(EXIT_OK)
    return EXIT_OK


def _cmd_install(args: argparse.Namespace, settings: WorkerSettings) -> int:
    queues = [validate_queue_name(q) for q in args.queue]
    if settings.app:
        queues += [q for q in load_app(settings.app).queues if q not in queues]
    url, _server = _database(settings)
    report = asyncio.run(install(url, queues))
    print(
        f"pgmq {report.pgmq_version} ({report.pgmq_source}); "
        f"queues created: {', '.join(report.created_queues) or 'none'}; "
        f"wakeup triggers created: {', '.join(report.created_triggers) or 'none'}"
    )
    return EXIT_OK


def _cmd_send(args: argparse.Namespace, settings: WorkerSettings) -> int:
    validate_queue_name(args.queue)
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise UsageError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise UsageError("payload must be a JSON object")
    url, _server = _database(settings)

    async def send() -> int:
        async with AsyncProducer(url) as producer:
            return await producer.enqueue(args.queue, payload, type=args.job_type, delay=args.delay)

    msg_id = asyncio.run(send())
    print(msg_id)
    return EXIT_OK


COMMANDS = {"run": _cmd_run, "install": _cmd_install, "send": _cmd_send}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        configure_logging(settings.log_level, settings.log_format)
        return COMMANDS[args.command](args, settings)
    except (UsageError, InvalidQueueName, InvalidSchedule, ValidationError, ValueError, TypeError) as exc:
        print(f"pg-worker: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SetupError, WorkerCrashed) as exc:
        print(f"pg-worker: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except psycopg.Error as exc:
        print(f"pg-worker: database error: {exc}".strip(), file=sys.stderr)
        return EXIT_FAILURE


def entrypoint() -> None:
    sys.exit(main())
