"""``./scripts/dev`` as a newcomer runs it: the whole system starts, the README's try-it commands work from another
shell (suspend and restore a customer, a signed payment restores the suspended one, each seen on the simulated
router), Ctrl-C stops every process and the embedded PostgreSQL; a second start reuses the data, keeps the secrets,
dead-letters nothing, and a part that dies stops the rest with a failure.

Everything runs in a data directory of its own and on free ports (``DEV_*`` variables), never the defaults.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg
import pytest

REPO = Path(__file__).resolve().parent.parent
READY = "local system ready"
SUSPENDED_LIST = "morosos"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def postmaster(data_dir: Path) -> psutil.Process | None:
    try:
        process = psutil.Process(int((data_dir / "postmaster.pid").read_text().split()[0]))
        return process if process.name() == "postgres" else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


@pytest.fixture
def dev_dir() -> Iterator[Path]:
    # Not under pytest's base temp: run as root, the embedded server runs as another user and needs the parents
    # open, which every new pytest session on this machine resets (see pg-worker/tests/conftest.py, pg_tmp_root).
    path = Path(tempfile.mkdtemp(prefix="wl-dev-"))
    yield path
    # A failed test must not leak a part (each carries DEV_DATA_DIR in its environment) or the server.
    leaked = [p for p in psutil.process_iter() if _environ(p).get("DEV_DATA_DIR") == str(path / "data")]
    for process in leaked:
        process.kill()
    psutil.wait_procs(leaked, timeout=10)
    left = postmaster(path / "data" / "postgres")
    if left is not None:
        left.terminate()
        left.wait(30)
    shutil.rmtree(path, ignore_errors=True)


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        environ: dict[str, str] = process.environ()
        return environ
    except psutil.Error:
        return {}


@dataclass
class Dev:
    """One ``./scripts/dev``, in its own process group (as in a terminal), with its output in ``log``."""

    proc: subprocess.Popen[bytes]
    log: Path
    data_dir: Path

    @classmethod
    def start(cls, data_dir: Path, ports: dict[str, int], name: str, **extra: str) -> Dev:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith(("WEBHOOK_", "WL_", "PG_WORKER_", "DEV_"))}
        env.update({f"DEV_{k}": str(v) for k, v in ports.items()}, DEV_DATA_DIR=str(data_dir), **extra)
        log = data_dir.parent / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([str(REPO / "scripts" / "dev")], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        dev = cls(proc, log, data_dir)
        wait_until(dev.ready, "the banner", timeout=90)
        return dev

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"./scripts/dev exited {self.proc.returncode}:\n{self.output()[-4000:]}"
        return READY in self.output()

    def banner_commands(self) -> list[str]:
        """The banner's try-it lines, after the line that sources the env file."""
        lines = self.output().split(READY, 1)[1].splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip().startswith(". "))
        return [line.strip() for line in lines[start + 1 :] if line.strip()]

    def env_values(self) -> dict[str, str]:
        values = {}
        for line in (self.data_dir / "dev.env").read_text().splitlines():
            match = re.fullmatch(r"export (\w+)='?([^']*)'?", line)
            if match and match.group(1) != "PATH":
                values[match.group(1)] = match.group(2)
        return values

    def shell(self, command: str) -> str:
        """``command`` in a fresh shell that sources the env file, as another terminal would."""
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith(("WEBHOOK_", "WL_", "PG_WORKER_"))}
        env["PATH"] = "/usr/bin:/bin"  # the env file must put the CLIs on PATH itself
        result = subprocess.run(["bash", "-c", f". {self.data_dir / 'dev.env'} && {command}"], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr[-2000:]}"
        return result.stdout

    def family(self) -> list[psutil.Process]:
        children: list[psutil.Process] = psutil.Process(self.proc.pid).children(recursive=True)
        return children

    def stop_and_check(self, sig: signal.Signals, *, group: bool, status: int) -> None:
        family = self.family()
        server = postmaster(self.data_dir / "postgres")
        assert server is not None and server.is_running()
        zombies = [p.pid for p in family if p.status() == psutil.STATUS_ZOMBIE]
        assert not zombies, f"zombie processes under ./scripts/dev: {zombies}"
        try:
            if group:
                os.killpg(self.proc.pid, sig)  # what Ctrl-C in a terminal does
            else:
                self.proc.send_signal(sig)
            assert self.proc.wait(60) == status, self.output()[-4000:]
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        server.wait(30)
        assert not server.is_running(), "./scripts/dev left its PostgreSQL running"
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, f"processes left behind: {[p.cmdline() for p in alive]}"


def router_list(values: dict[str, str]) -> set[str]:
    """The addresses in the simulated router's suspended list, read over its REST API."""
    request = urllib.request.Request(f"{values['WL_ROUTER_URL']}/rest/ip/firewall/address-list?list={SUSPENDED_LIST}")
    request.add_header("Authorization", "Basic " + b64encode(f"admin:{values['WL_SIM_PASSWORD']}".encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return {entry["address"] for entry in json.load(response) if entry.get("disabled") != "true"}


def try_it(dev: Dev, command: str, address: str, *, suspended: bool) -> None:
    """A README line: the action, then (once the router changed) the ``service show`` that confirms it."""
    action, _, show = command.partition("; sleep 1; ")
    assert show.startswith("wl-workers service show "), command
    dev.shell(action)
    values = dev.env_values()
    wait_until(lambda: (address in router_list(values)) == suspended, f"{command} on the router")
    assert f"device    {'suspended' if suspended else 'active'} ({address} is" in dev.shell(show)


def console_login(dev: Dev, port: int) -> None:
    """The banner names the console and its development login, and that login works (form, CSRF token, cookie)."""
    url = f"http://127.0.0.1:{port}"
    values = dev.env_values()
    assert f"console   {url}/  (user dev, password: WL_CONSOLE_DEV_PASSWORD in" in dev.output()
    assert values["WL_CONSOLE_DEV_PASSWORD"] not in dev.output()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(), _NoRedirect())
    with opener.open(f"{url}/login", timeout=5) as page:
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.read().decode())
    assert token is not None
    form = urllib.parse.urlencode({"csrf_token": token.group(1), "username": "dev", "password": values["WL_CONSOLE_DEV_PASSWORD"]}).encode()
    with pytest.raises(urllib.error.HTTPError) as redirect:  # the 303, not followed
        opener.open(urllib.request.Request(f"{url}/login", data=form), timeout=10)
    redirect.value.close()
    assert redirect.value.code == 303 and redirect.value.headers["location"] == "/customers", redirect.value.code


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def dead_letters(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM pgmq.q_device_actions_dlq) + (SELECT count(*) FROM pgmq.q_payment_sync_dlq)").fetchone()
    return int(row[0]) if row else -1


@pytest.mark.slow
@pytest.mark.timeout(300)  # three starts of the whole system (console included) on a loaded 2-core machine
def test_dev_starts_the_whole_system_the_readme_commands_work_and_ctrl_c_stops_everything(dev_dir: Path) -> None:
    data_dir = dev_dir / "data"
    ports = {"ROUTER_PORT": free_port(), "WORKER_PORT": free_port(), "WEBHOOK_PORT": free_port(), "CONSOLE_PORT": free_port()}
    dev = Dev.start(data_dir, ports, "first")
    commands = dev.banner_commands()
    console_login(dev, ports["CONSOLE_PORT"])  # after reading the banner: the console logs the login below it
    readme = (REPO / "README.md").read_text()
    assert len(commands) == 3 and all(c in readme for c in commands), f"the README shows the banner's commands: {commands}"
    assert ". .data/dev.env" in readme
    values = dev.env_values()
    assert values["WEBHOOK_STANDARD_SECRETS"].startswith("whsec_") and values["WL_SIM_PASSWORD"]
    assert (data_dir / "dev.env").stat().st_mode & 0o077 == 0, "the secrets file is private"
    assert "10.20.0.13" in router_list(values) and "10.20.0.11" not in router_list(values)

    deactivate, activate, payment = commands
    try_it(dev, deactivate, "10.20.0.11", suspended=True)
    try_it(dev, activate, "10.20.0.11", suspended=False)
    try_it(dev, payment, "10.20.0.13", suspended=False)  # signed payment.approved -> service.activate
    dev.stop_and_check(signal.SIGINT, group=True, status=0)
    assert "dev: stopped" in dev.output()
    assert values["WL_SIM_PASSWORD"] not in dev.output() and values["WEBHOOK_STANDARD_SECRETS"] not in dev.output()

    # Again, with the router elsewhere: migrations and seed are re-run harmlessly, the secrets kept.
    ports["ROUTER_PORT"] = free_port()
    again = Dev.start(data_dir, ports, "second")
    assert {k: v for k, v in again.env_values().items() if "PASSWORD" in k or "SECRETS" in k} == {
        k: v for k, v in values.items() if "PASSWORD" in k or "SECRETS" in k
    }
    assert "10.20.0.13" in router_list(again.env_values()), "a fresh simulated router, seeded"
    try_it(again, payment, "10.20.0.13", suspended=False)  # the demo device follows the simulator's new port
    assert dead_letters(again.env_values()["DATABASE_URL"]) == 0

    again.stop_and_check(signal.SIGTERM, group=False, status=0)  # a service manager's stop

    # A part that dies takes the system down, named, with a failure status.
    # (from a shell that sourced dev.env: its DATABASE_URL names our own embedded server, which is not running)
    again = Dev.start(data_dir, ports, "third", DATABASE_URL=values["DATABASE_URL"])
    family = again.family()
    worker = next(p for p in family if "run" in p.cmdline() and any(a.endswith("wl-workers") for a in p.cmdline()))
    server = postmaster(data_dir / "postgres")
    assert server is not None
    worker.kill()
    assert again.proc.wait(60) == 1, again.output()[-4000:]
    assert "worker (wl-workers run) exited unexpectedly" in again.output()
    server.wait(30)
    assert not server.is_running(), "./scripts/dev left its PostgreSQL running after a failure"
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"processes left behind: {[p.cmdline() for p in alive]}"


def test_dev_refuses_a_busy_port_at_once_naming_the_variable(dev_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {"ROUTER_PORT": free_port(), "WORKER_PORT": free_port(), "WEBHOOK_PORT": busy.getsockname()[1], "CONSOLE_PORT": free_port()}
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("DEV_")}
        env.update({f"DEV_{k}": str(v) for k, v in ports.items()}, DEV_DATA_DIR=str(dev_dir / "data"))
        result = subprocess.run([str(REPO / "scripts" / "dev")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"port {ports['WEBHOOK_PORT']} on 127.0.0.1 is not free" in result.stderr and "set DEV_WEBHOOK_PORT" in result.stderr
    assert not (dev_dir / "data" / "postgres").exists(), "no database was started"


@pytest.mark.slow
def test_a_killed_dev_takes_its_parts_with_it(dev_dir: Path) -> None:
    data_dir = dev_dir / "data"
    dev = Dev.start(data_dir, {"ROUTER_PORT": free_port(), "WORKER_PORT": free_port(), "WEBHOOK_PORT": free_port(), "CONSOLE_PORT": free_port()}, "killed")
    family = dev.family()
    assert len(family) == 4, [p.cmdline() for p in family]
    dev.proc.kill()  # no handler runs: the kernel tells the parts (PR_SET_PDEATHSIG)
    dev.proc.wait(30)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"parts outlived a killed ./scripts/dev: {[p.cmdline() for p in alive]}"
    # The server outlives a SIGKILL (nobody could stop it); the next start takes it over and stops it.
    server = postmaster(data_dir / "postgres")
    assert server is not None
    again = Dev.start(data_dir, {"ROUTER_PORT": free_port(), "WORKER_PORT": free_port(), "WEBHOOK_PORT": free_port(), "CONSOLE_PORT": free_port()}, "after-kill")
    again.stop_and_check(signal.SIGINT, group=True, status=0)
    server.wait(30)


def _dev_once(dev_dir: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("DEV_")}
    env.update({f"DEV_{k}": str(free_port()) for k in ("ROUTER_PORT", "WORKER_PORT", "WEBHOOK_PORT")}, DEV_DATA_DIR=str(dev_dir / "data"), **extra)
    return subprocess.run([str(REPO / "scripts" / "dev")], env=env, capture_output=True, text=True, timeout=120)


def test_dev_refuses_a_database_url_of_yours_unless_told(dev_dir: Path) -> None:
    result = _dev_once(dev_dir, DATABASE_URL="postgresql://billing:hunter2@127.0.0.1:1/production")
    assert result.returncode == 1, result.stderr
    assert "is not this system's own database" in result.stderr and "DEV_USE_DATABASE_URL=1" in result.stderr
    assert "hunter2" not in result.stderr and not (dev_dir / "data" / "postgres").exists(), "nothing was started"


def test_a_second_dev_on_the_same_data_says_where_the_first_runs(dev_dir: Path) -> None:
    import fcntl

    (dev_dir / "data").mkdir()
    with (dev_dir / "data" / "dev.lock").open("w") as held:  # what a running ./scripts/dev holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        result = _dev_once(dev_dir)
    assert result.returncode == 1, result.stderr
    assert f"another ./scripts/dev (pid 4242) is running with its data in {dev_dir / 'data'}" in result.stderr
    assert not (dev_dir / "data" / "postgres").exists() and not (dev_dir / "data" / "dev.env").exists(), "nothing touched"


@pytest.mark.slow
def test_a_postmaster_killed_and_restarted_by_a_cli_is_stopped_with_dev(dev_dir: Path) -> None:
    data_dir = dev_dir / "data"
    dev = Dev.start(data_dir, {"ROUTER_PORT": free_port(), "WORKER_PORT": free_port(), "WEBHOOK_PORT": free_port()}, "restarted")
    first = postmaster(data_dir / "postgres")
    assert first is not None
    first.kill()
    first.wait(30)
    # an operator's CLI on the same data directory starts it again (and leaves it to its other user, dev)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith(("WL_", "PG_WORKER_"))}
    env["PG_WORKER_DATA_DIR"] = str(data_dir / "postgres")

    def restarted() -> bool:
        result = subprocess.run([str(REPO / ".venv" / "bin" / "pg-worker"), "queues", "--json"], env=env, capture_output=True, text=True, timeout=60)
        return result.returncode == 0  # the killed server's backends may hold its shared memory for a moment

    wait_until(restarted, "the CLI restarting the killed server", timeout=60)
    second = postmaster(data_dir / "postgres")
    assert second is not None and second.pid != first.pid
    dev.stop_and_check(signal.SIGINT, group=True, status=0)
    second.wait(30)
    assert not second.is_running(), "./scripts/dev left the restarted PostgreSQL running"
