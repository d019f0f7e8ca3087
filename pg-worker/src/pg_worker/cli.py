"""The ``pg-worker`` command. Every flag mirrors an environment variable, named in its help text."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from . import admin
from ._app import WorkerFailure
from ._database import redact_url, resolve_database_url
from ._install import SetupError, install
from ._names import InvalidQueueName, validate_queue_name
from ._producer import Producer
from ._schedule import InvalidSchedule
from ._worker import Worker, WorkerCrashed
from .health import HealthProbe
from .logging_setup import configure_logging, redact_text
from .metrics import instrument
from .observability import ObservabilityServer
from .settings import WorkerSettings, load_app

logger = logging.getLogger("pg_worker.cli")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# Without a terminal rich would wrap tables at 80 columns; piped output is for grep and files, so keep rows whole.
PIPED_WIDTH = 10_000


class UsageError(Exception):
    """Bad input from the command line: printed without a traceback, exit code 2."""


def _count(text: str) -> int:
    """A --limit: a whole number, 0 or more (a negative one would reach the database as LIMIT -1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


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
    _flag(run, "--concurrency", env="PG_WORKER_CONCURRENCY", type=int, help="jobs run at once (default 100)")
    _flag(run, "--poll-interval", env="PG_WORKER_POLL_INTERVAL", help="fallback poll interval, e.g. 60s, 15m, or 'off' outside windows (default 60s)")
    _flag(run, "--poll-windows", env="PG_WORKER_POLL_WINDOWS", help="poll windows, e.g. '08:00-18:00 every 15m; 22:00-06:00 every 1h'")
    _flag(run, "--poll-timezone", env="PG_WORKER_POLL_TIMEZONE", help="time zone of the poll windows, e.g. America/Santiago (default UTC)")
    _flag(run, "--listen", env="PG_WORKER_LISTEN", choices=["true", "false"], help="wake on LISTEN/NOTIFY; false = poll-only (default true)")
    _flag(run, "--shutdown-grace", env="PG_WORKER_SHUTDOWN_GRACE", type=float, help="seconds in-flight jobs get to finish on SIGTERM (default 30)")
    _flag(run, "--auto-install", env="PG_WORKER_AUTO_INSTALL", choices=["true", "false"], help="create missing queues/triggers at start-up (default true)")
    _flag(run, "--worker-id", env="PG_WORKER_WORKER_ID", help="stable worker name (default host-pid-random)")
    _flag(run, "--metrics", env="PG_WORKER_METRICS", choices=["true", "false"], help="serve /metrics, /healthz, /readyz (default true)")
    _flag(run, "--metrics-host", env="PG_WORKER_METRICS_HOST", help="address of the metrics/health port (default 127.0.0.1; 0.0.0.0 in the image)")
    _flag(run, "--metrics-port", env="PG_WORKER_METRICS_PORT", type=int, help="metrics/health port (default 9480)")
    _common(run)

    inst = commands.add_parser("install", help="install pgmq, pg-worker's schema, the queues and their wakeup triggers")
    inst.add_argument("app", nargs="?", default=None, help="take the queues from this App ('module:attribute') [env: PG_WORKER_APP]")
    inst.add_argument("--queue", action="append", default=[], help="a queue to create (repeatable)")
    inst.add_argument("--grant", action="append", default=[], metavar="ROLE", help="grant a worker role that owns nothing what it needs on these queues (repeatable)")
    _common(inst)

    send = commands.add_parser("send", help="send one job")
    send.add_argument("queue", help="queue name")
    send.add_argument("payload", help="the job as a JSON object, e.g. '{\"customer_id\": 42}'; '-' reads it from stdin, '@path' from a file")
    send.add_argument("--delay", type=float, default=None, help="seconds before the job becomes visible")
    send.add_argument("--type", dest="job_type", default=None, help="set the message's 'type' field")
    _flag(send, "--max-delay", env="PG_WORKER_MAX_DELAY", type=float, help="largest accepted --delay in seconds (default one year)")
    _flag(send, "--max-message-size", env="PG_WORKER_MAX_MESSAGE_SIZE", type=int, help="largest accepted message, in bytes of JSON (default 1 MiB)")
    _common(send)

    queues = commands.add_parser("queues", help="a table of queues: depth, visible, running, waiting to retry, delayed, oldest age, DLQ depth")
    queues.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(queues)

    status = commands.add_parser("status", help="queue depths and rates (enqueued/s, done/s, dead-lettered/s)")
    status.add_argument("--watch", action="store_true", help="keep refreshing until Ctrl-C")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between samples (default 2)")
    status.add_argument("--iterations", type=int, default=0, help="with --watch: stop after this many refreshes (0 = never)")
    status.add_argument("--json", action="store_true", help="print JSON (one sample, without --watch)")
    _common(status)

    dlq = commands.add_parser("dlq", help="inspect and act on dead-letter queues")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_ls = dlq_commands.add_parser("list", help="dead letters of a queue, oldest first")
    dlq_ls.add_argument("queue", help="the queue (or its _dlq)")
    dlq_ls.add_argument("--limit", type=_count, default=50, help="at most this many (default 50)")
    dlq_ls.add_argument("--wide", action="store_true", help="the whole message and error, not cut to the terminal")
    dlq_ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    dlq_show = dlq_commands.add_parser("show", help="one dead letter in full (JSON)")
    dlq_show.add_argument("queue", help="the queue (or its _dlq)")
    dlq_show.add_argument("dlq_id", type=int, metavar="DLQ_ID", help="the dead letter's dlq_id, as `dlq list` shows it")
    for action, text in (("replay", "send dead letters back to their queue, attempts reset"), ("purge", "delete dead letters for good")):
        sub = dlq_commands.add_parser(action, help=text)
        sub.add_argument("queue", help="the queue (or its _dlq)")
        sub.add_argument("dlq_ids", type=int, nargs="*", metavar="DLQ_ID", help="dlq_ids as `dlq list` shows them (not the original msg_id)")
        sub.add_argument("--all", dest="every", action="store_true", help="every message in the DLQ")
        if action == "purge":
            sub.add_argument("--yes", "-y", action="store_true", help="with --all: do not ask (needed without a terminal)")
    for sub in dlq_commands.choices.values():
        _common(sub)
    return parser


def _settings(args: argparse.Namespace) -> WorkerSettings:
    overrides: dict[str, Any] = {}
    for field in ("app", "concurrency", "poll_interval", "poll_windows", "poll_timezone", "shutdown_grace", "worker_id", "data_dir", "log_level", "log_format", "metrics_host", "metrics_port", "max_delay", "max_message_size"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    for field in ("listen", "auto_install", "metrics"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value == "true"
    return WorkerSettings(**overrides)


def check_database_url(url: str) -> None:
    """A malformed URL is a permanent error: say what libpq found wrong at once, without the password."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        reason = redact_text(str(exc).strip().replace(url, redact_url(url)))
        raise UsageError(f"DATABASE_URL is malformed: {reason}") from exc
    # libpq checks ports only when connecting, and a pool would retry that forever.
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise UsageError(f"DATABASE_URL is malformed: invalid port {port!r} in {redact_url(url)}")


def _database(settings: WorkerSettings) -> tuple[str, Any]:
    if settings.database_url:
        check_database_url(settings.database_url)
        return settings.database_url, None
    return resolve_database_url(settings.data_dir)


def _console() -> Console:
    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(width=PIPED_WIDTH) if piped else Console()


async def serve(worker: Worker, settings: WorkerSettings, embedded: Any = None) -> None:
    """Run ``worker`` as ``pg-worker run`` does: ``/metrics`` (with the app's collectors), ``/healthz`` and
    ``/readyz`` on the settings' port, SIGTERM/SIGINT/SIGHUP for a graceful stop (a second signal forces it).

    For services with a command of their own. Raises what :meth:`Worker.run` raises (:class:`WorkerFailure`,
    :class:`WorkerCrashed`) after the graceful stop. ``embedded``: an embedded server to stop on a forced exit.
    """
    loop = asyncio.get_running_loop()
    server = None
    if settings.metrics:
        metrics = instrument(worker, stats_max_age=settings.queue_stats_interval)
        try:
            server = ObservabilityServer(HealthProbe(worker), metrics, loop, host=settings.metrics_host, port=settings.metrics_port).start()
        except OSError as exc:
            raise SetupError(f"cannot serve /metrics on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror or exc}") from exc
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
            if embedded is not None:
                embedded.cleanup()  # os._exit skips atexit, where the embedded server would be stopped
            logging.shutdown()
            os._exit(EXIT_FAILURE)  # unfinished messages come back after their visibility timeout

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: the terminal went away
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await worker.run()
    finally:
        if server is not None:
            server.stop()


def _cmd_run(args: argparse.Namespace, settings: WorkerSettings) -> int:
    if not settings.app:
        raise UsageError("no app given: pass 'module:attribute' or set PG_WORKER_APP")
    config = settings.worker_config()
    app = load_app(settings.app)
    url, _server = _database(settings)
    logger.info("database", extra={"event": "database", "url": redact_url(url), "embedded": _server is not None})
    worker = Worker(app, url, config, listen_conninfo=settings.listen_url)
    # What was imported and built so far lives as long as the process: keep it out of the collector's full
    # passes, which otherwise walk all of it again and again while jobs allocate (8% of the drain profile).
    gc.freeze()
    failure: WorkerFailure | WorkerCrashed | None = None
    try:
        asyncio.run(serve(worker, settings, _server))
    except (WorkerFailure, WorkerCrashed) as exc:
        failure = exc
    if worker.sync_jobs_running:
        # Their messages stay leased until their visibility timeout (never visible while a thread may still run
        # them); Python would otherwise wait for these threads at exit.
        logger.warning("sync_jobs_abandoned", extra={"event": "sync_jobs_abandoned", "threads": worker.sync_jobs_running})
        code = EXIT_OK if failure is None else _fail(str(failure), EXIT_FAILURE, _json_logs(args))
        if _server is not None:
            _server.cleanup()
        logging.shutdown()
        os._exit(code)
    if failure is not None:
        raise failure
    return EXIT_OK


def _cmd_install(args: argparse.Namespace, settings: WorkerSettings) -> int:
    queues = [validate_queue_name(q) for q in args.queue]
    if settings.app:
        queues += [q for q in load_app(settings.app).queues if q not in queues]
    url, _server = _database(settings)
    report = asyncio.run(install(url, queues, grant_to=args.grant))
    print(
        f"pgmq {report.pgmq_version} ({report.pgmq_source}); "
        f"queues created: {', '.join(report.created_queues) or 'none'}; "
        f"wakeup triggers created: {', '.join(report.created_triggers) or 'none'}"
    )
    return EXIT_OK


def _payload_text(argument: str) -> str:
    if argument == "-":
        return sys.stdin.read()
    if argument.startswith("@"):
        try:
            return Path(argument[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read payload from {argument[1:]!r}: {getattr(exc, 'strerror', None) or exc}") from exc
    return argument


def _cmd_send(args: argparse.Namespace, settings: WorkerSettings) -> int:
    validate_queue_name(args.queue)
    try:
        payload = json.loads(_payload_text(args.payload))
    except json.JSONDecodeError as exc:
        raise UsageError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise UsageError("payload must be a JSON object")
    producer = Producer(max_delay=settings.max_delay, max_message_size=settings.max_message_size)
    producer.send_params(args.queue, payload, args.job_type, args.delay, None)  # bad input fails before connecting
    conn, _server = _connect(settings)
    with conn:
        admin.check_queue(conn, args.queue)
        msg_id = producer.enqueue(args.queue, payload, type=args.job_type, delay=args.delay, conn=conn)
    print(msg_id)
    return EXIT_OK


def _connect(settings: WorkerSettings) -> tuple[psycopg.Connection[Any], Any]:
    url, server = _database(settings)
    return psycopg.connect(url, autocommit=True, connect_timeout=10), server


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _queue_table(stats: list[admin.QueueStats], rates: dict[str, tuple[float, float, float]] | None = None) -> Table:
    table = Table(title="pgmq queues", header_style="bold")
    for column in ("queue", "depth", "visible", "running", "retrying", "delayed", "oldest", "dlq"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    if rates is not None:
        for column in ("in/s", "done/s", "dead/s"):
            table.add_column(column, justify="right")
    for s in stats:
        depth = f"~{s.depth:,}" if s.estimated else f"{s.depth:,}"
        cells = [s.queue, depth, f"{s.visible:,}", f"{s.in_flight:,}", f"{s.retrying:,}", f"{s.delayed:,}", _age(s.oldest_age), f"{s.dlq_depth:,}"]
        if rates is not None:
            cells += [f"{r:,.1f}" for r in rates.get(s.queue, (0.0, 0.0, 0.0))]
        table.add_row(*cells, style="red" if s.dlq_depth else None)
    return table


def _cmd_queues(args: argparse.Namespace, settings: WorkerSettings) -> int:
    conn, _server = _connect(settings)
    with conn:
        stats = admin.fetch_queue_stats(conn)
    if args.json:
        print(json.dumps([asdict(s) for s in stats]))
    elif not stats:
        print("no queues (run `pg-worker install`)")
    else:
        _console().print(_queue_table(stats))
    return EXIT_OK


def _rates(before: list[admin.QueueStats], after: list[admin.QueueStats], seconds: float) -> dict[str, tuple[float, float, float]]:
    """Per queue: enqueued/s (the msg_id sequence), done/s (enqueued minus depth growth), dead-lettered/s."""
    earlier = {s.queue: s for s in before}
    rates = {}
    for s in after:
        prev = earlier.get(s.queue)
        if prev is None or seconds <= 0:
            continue
        enqueued = (s.enqueued_total - prev.enqueued_total) / seconds
        done = max(0.0, enqueued - (s.depth - prev.depth) / seconds)
        rates[s.queue] = (enqueued, done, max(0.0, (s.dlq_depth - prev.dlq_depth) / seconds))
    return rates


def _cmd_status(args: argparse.Namespace, settings: WorkerSettings) -> int:
    if args.interval <= 0:
        raise UsageError("--interval must be > 0")
    if args.json and args.watch:
        raise UsageError("--json prints one sample: leave out --watch")
    conn, _server = _connect(settings)
    console = _console()
    with conn:
        before, at = admin.fetch_queue_stats(conn), time.monotonic()
        if not args.watch:
            time.sleep(args.interval)
            after = admin.fetch_queue_stats(conn)
            rates = _rates(before, after, time.monotonic() - at)
            if args.json:
                names = ("enqueued_per_s", "done_per_s", "dead_lettered_per_s")
                print(json.dumps([{**asdict(s), **dict(zip(names, rates.get(s.queue, (0.0, 0.0, 0.0)), strict=True))} for s in after]))
            else:
                console.print(_queue_table(after, rates))
            return EXIT_OK
        refreshes = 0
        with Live(_queue_table(before, {}), console=console, auto_refresh=False) as live:
            try:
                while not args.iterations or refreshes < args.iterations:
                    time.sleep(args.interval)
                    after, now = admin.fetch_queue_stats(conn), time.monotonic()
                    live.update(_queue_table(after, _rates(before, after, now - at)), refresh=True)
                    before, at = after, now
                    refreshes += 1
            except KeyboardInterrupt:
                pass
    return EXIT_OK


# Fields that name what a job is about (a customer, a device, a payment): shown first, so a cut message keeps them.
SUBJECT_KEYS = ("service_id", "device", "payment_id", "customer_id", "id")


def _subject(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    keys = [k for k in SUBJECT_KEYS if k in message] + sorted(k for k in message if k.endswith("_id") and k not in SUBJECT_KEYS)
    return " ".join(f"{k}={message[k]}" for k in keys if not isinstance(message[k], dict | list))


def _dlq_table(queue: str, letters: list[admin.DeadLetter], *, wide: bool = False) -> Table:
    table = Table(title=f"dead letters of {queue}", header_style="bold")
    for column in ("dlq_id", "original msg_id", "dead since", "attempts", "type", "subject", "reason", "error", "message"):
        table.add_column(column, overflow="fold" if wide else "ellipsis")
    for d in letters:
        error = d.error
        message = d.body.get("message")
        rest = {k: v for k, v in message.items() if k != "type"} if isinstance(message, dict) else message
        error_text = f"{str(error.get('type', '')).rsplit('.', 1)[-1]}: {error.get('message', '')}"
        message_text = json.dumps(rest)
        table.add_row(
            str(d.dlq_id),
            str(d.original_msg_id if d.original_msg_id is not None else "-"),
            d.dead_since.strftime("%Y-%m-%d %H:%M:%S"),
            str(d.body.get("attempts", "")),
            str(message.get("type", "")) if isinstance(message, dict) else "",
            _subject(message),
            str(error.get("reason", "")),
            error_text if wide else error_text[:80],
            message_text if wide else message_text[:80],
        )
    return table


def _cmd_dlq(args: argparse.Namespace, settings: WorkerSettings) -> int:
    conn, _server = _connect(settings)
    with conn:
        if args.dlq_command == "list":
            letters = admin.dlq_list(conn, args.queue, limit=args.limit)
            if args.json:
                print(json.dumps([d.as_dict() for d in letters], default=str))
            else:
                _console().print(_dlq_table(args.queue, letters, wide=args.wide) if letters else f"{args.queue}: no dead letters")
        elif args.dlq_command == "show":
            print(json.dumps(admin.dlq_show(conn, args.queue, args.dlq_id).as_dict(), indent=2, default=str))
        elif args.dlq_command == "replay":
            moved = admin.dlq_replay(conn, args.queue, args.dlq_ids, every=args.every)
            queue = args.queue.removesuffix("_dlq")
            print(f"replayed {len(moved)} message(s) to {queue}" + "".join(f"\n  dlq_id {old} -> msg_id {new} in {queue}" for old, new in moved))
        else:
            if args.every and not args.yes:
                _confirm_purge_all(conn, args.queue)
            purged = admin.dlq_purge(conn, args.queue, args.dlq_ids, every=args.every)
            dlq = f"{args.queue.removesuffix('_dlq')}_dlq"
            print(f"purged {len(purged)} message(s) from {dlq}" + "".join(f"\n  dlq_id {dlq_id}" for dlq_id in sorted(purged)))
    return EXIT_OK


def _confirm_purge_all(conn: psycopg.Connection[Any], queue: str) -> None:
    """Deleting every dead letter for good: typed agreement on a terminal, or --yes; never silently."""
    _, dlq = admin.resolve_dlq(conn, queue)
    if not sys.stdin.isatty():
        raise UsageError(f"dlq purge --all deletes every message of {dlq} for good: add --yes (no terminal to ask)")
    if input(f"delete every dead letter of {dlq} for good? [y/N] ").strip().lower() not in ("y", "yes"):
        raise UsageError(f"dlq purge --all: not confirmed, nothing deleted from {dlq}")


COMMANDS = {"run": _cmd_run, "install": _cmd_install, "send": _cmd_send, "queues": _cmd_queues, "status": _cmd_status, "dlq": _cmd_dlq}


def _exit_on_signal(signum: int, _frame: object) -> None:
    # The default action ends the process without atexit hooks, which is where the embedded server is stopped.
    raise SystemExit(128 + signum)


def _json_logs(args: argparse.Namespace) -> bool:
    chosen = getattr(args, "log_format", None) or os.environ.get("PG_WORKER_LOG_FORMAT") or "auto"
    return chosen == "json" or (chosen == "auto" and not sys.stderr.isatty())


def settings_error(exc: ValidationError) -> str:
    """One line naming each bad variable (``PG_WORKER_CONCURRENCY=abc: ...``), not pydantic's multi-line dump;
    a URL's value is never shown (it may hold a password)."""
    problems = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        variable = field if field.isupper() else f"PG_WORKER_{field.upper()}"
        value = error.get("input")
        shown = f"={value}" if isinstance(value, str) and "url" not in field.lower() and len(value) <= 80 else ""
        problems.append(f"{variable}{shown}: {str(error['msg']).removeprefix('Value error, ')}")
    return "bad settings: " + "; ".join(problems)


def _fail(message: str, code: int, json_errors: bool) -> int:
    """The last word of a failed command, in the log format: with JSON logs, stderr holds JSON lines only.

    Written directly (not through logging): it must work even when the logging settings were the bad input.
    """
    message = redact_text(message)
    if json_errors:
        record = {"event": "cli_error", "level": "error", "logger": logger.name, "error": message, "exit_code": code}
        print(json.dumps({**record, "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}), file=sys.stderr)
    else:
        print(f"pg-worker: {'error: ' if code == EXIT_USAGE else ''}{message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    json_errors = _json_logs(args)
    try:
        settings = _settings(args)
        configure_logging(settings.log_level, settings.log_format)
        return COMMANDS[args.command](args, settings)
    except ValidationError as exc:
        return _fail(settings_error(exc), EXIT_USAGE, json_errors)
    except (UsageError, InvalidQueueName, InvalidSchedule, ValueError, TypeError, admin.UnknownQueue) as exc:
        return _fail(str(exc), EXIT_USAGE, json_errors)
    except (SetupError, WorkerCrashed, WorkerFailure, admin.AdminError) as exc:
        return _fail(str(exc), EXIT_FAILURE, json_errors)
    except psycopg.Error as exc:
        return _fail(f"database error: {exc}".strip(), EXIT_FAILURE, json_errors)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def entrypoint() -> None:
    sys.exit(main())
