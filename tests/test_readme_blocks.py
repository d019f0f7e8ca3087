"""Docs match the commands (issue 16, item 7): the ``sh`` blocks of pg-worker/README.md, payment-webhook/README.md
and wl-console/README.md run here, as written, against an embedded PostgreSQL 18 (``pg_worker.testing.PgServer``),
with traffic on 127.0.0.1 only. A block that cannot run on a test machine (docker, a real provider, an operator at
a prompt) carries ``<!-- not run: reason -->`` on the line before it; a block that is neither run here nor marked
fails ``test_every_readme_sh_block_is_run_or_marked_not_run``, so a new block cannot be forgotten.

What each test changes in a block, and nothing else, is listed in the test (``substitutions``).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pg_worker.testing import PgServer, wait_until_sync

REPO = Path(__file__).resolve().parent.parent
READMES = ["pg-worker/README.md", "payment-webhook/README.md", "wl-console/README.md"]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->")
SHELLS = ("```sh", "```bash", "```console")


def sh_blocks(readme: str, root: Path = REPO) -> list[tuple[str, str | None]]:
    """(block text, the not-run reason or None) for each shell block of a README."""
    lines, blocks = (root / readme).read_text().splitlines(), []
    at = 0
    while at < len(lines):
        if lines[at].strip() in SHELLS:
            end = lines.index("```", at + 1)
            previous = next((lines[i] for i in range(at - 1, -1, -1) if lines[i].strip()), "")
            marked = NOT_RUN.search(previous)
            blocks.append(("\n".join(lines[at + 1 : end]) + "\n", marked.group(1) if marked else None))
            at = end
        at += 1
    return blocks


def block(readme: str, first_line: str) -> str:
    """The block of ``readme`` whose first line starts with ``first_line`` (exactly one, unmarked)."""
    found = [text for text, reason in sh_blocks(readme) if text.startswith(first_line) and reason is None]
    assert len(found) == 1, f"{readme}: {len(found)} unmarked sh blocks start with {first_line!r}"
    return found[0]


# the blocks the tests below run, by README and first line
RUN = {
    ("pg-worker/README.md", "PYTHONPATH=pg-worker/examples .venv/bin/pg-worker run demo:app &"),
    ("payment-webhook/README.md", "export DATABASE_URL=postgresql://...           #"),
    ("payment-webhook/README.md", "payment-webhook send-test-event"),
    ("wl-console/README.md", "export DATABASE_URL=postgresql://..."),
    ("payment-webhook/README.md", "export DATABASE_URL=postgresql://...  WL_SIM"),
}


def test_every_readme_sh_block_is_run_or_marked_not_run() -> None:
    unaccounted = []
    for readme in READMES:
        for text, reason in sh_blocks(readme):
            run = any(readme == r and text.startswith(first) for r, first in RUN)
            if reason is None and not run:
                unaccounted.append(f"{readme}: {text.splitlines()[0]}")
            assert not (run and reason), f"{readme}: a block marked not run is run here: {text.splitlines()[0]}"
    for readme, first in RUN:  # a run block is told apart from any other by its first line
        count = sum(text.startswith(first) and reason is None for text, reason in sh_blocks(readme))
        assert count == 1, f"{readme}: {count} unmarked sh blocks start with {first!r}"
    assert not unaccounted, f"sh blocks neither run by tests/test_readme_blocks.py nor marked <!-- not run: reason -->: {unaccounted}"


def test_the_block_finder_tells_a_marked_block_from_an_unmarked_one(tmp_path: Path) -> None:
    """The check above can fail: a block without the comment on the line before it (blank lines aside) is
    unmarked, and the one marked carries its reason."""
    (tmp_path / "README.md").write_text(
        "# x\n\n<!-- not run: docker -->\n\n```sh\ndocker ps\n```\n\ntext\n```sh\necho new\n```\n```python\nx = 1\n```\n"
    )
    assert sh_blocks("README.md", tmp_path) == [("docker ps\n", "docker"), ("echo new\n", None)]
    for readme in READMES:
        assert sh_blocks(readme), f"{readme} has no sh block: the finder is broken"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with PgServer.running() as server:
        yield server


@pytest.fixture
def database(pg: PgServer) -> Iterator[str]:
    with pg.clone() as url:
        yield url


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WL_", "PG_WORKER_", "WEBHOOK_", "DATABASE_URL"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", **extra)
    return env


def run_script(script: str, env: dict[str, str], log: Path, timeout: float = 60) -> tuple[subprocess.Popen[str], str]:
    """Runs ``script`` with bash from the repository root in a process group of its own, output to ``log``;
    returns once bash exits (its background jobs keep running until the group is killed)."""
    with log.open("w") as out:
        process = subprocess.Popen(["bash", "-c", "set -e\n" + script], cwd=REPO, env=env, text=True, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"the block did not finish within {timeout}s:\n{log.read_text()[-3000:]}") from None
    return process, log.read_text()


def wait_ready(port: int) -> str:
    """A shell line waiting for ``/readyz`` on ``port``: what a person does by waiting for uvicorn's start line."""
    return (
        "python3 -c 'import time, urllib.request\nfor _ in range(300):\n"
        f"    try: urllib.request.urlopen(\"http://127.0.0.1:{port}/readyz\"); break\n"
        "    except OSError: time.sleep(0.1)'\n"
    )


def kill_group(process: subprocess.Popen[str], grace: float = 20.0) -> None:
    """Stops the block's background jobs (the whole process group) before its database is dropped: SIGTERM, then
    SIGKILL for what is still there after ``grace`` seconds. A test run that left one running was seen."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def test_pg_worker_readme_runnable_example(database: str, tmp_path: Path) -> None:
    """The pg-worker README's runnable example: the demo worker and the six example jobs, three dead-lettered."""
    # substitutions (environment only, the block is run unchanged): DATABASE_URL = a fresh database on the test
    # server instead of the embedded one in .data/postgres; PG_WORKER_METRICS=false (9480 may be taken here)
    script = block("pg-worker/README.md", "PYTHONPATH=pg-worker/examples")
    assert (REPO / ".venv/bin/pg-worker").exists(), "run ./scripts/bootstrap first: the README calls .venv/bin/..."
    env = clean_env(DATABASE_URL=database, PG_WORKER_METRICS="false")
    process, out = run_script(script, env, tmp_path / "out.log")
    try:
        assert process.returncode == 0, out[-3000:]
        assert "examples_sent" in out, out[-3000:]

        def dead_letters() -> int:
            with psycopg.connect(database) as conn:
                row = conn.execute("SELECT count(*) FROM pgmq.q_provisioning_dlq").fetchone()
                return int(row[0]) if row else 0

        wait_until_sync(lambda: dead_letters() == 3, timeout=20, what="the three dead-lettered examples")
    finally:
        kill_group(process)
    assert "Traceback" not in out, out[-3000:]


def test_payment_webhook_readme_run_it_and_send_a_test_event(database: str, tmp_path: Path) -> None:
    """The payment-webhook README's "Run it" block, then its send-test-event block against that server."""
    port = free_port()
    standard = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    mercadopago = secrets.token_hex(16)
    substitutions = {  # what changes in the blocks, and why
        "export DATABASE_URL=postgresql://...": f"export DATABASE_URL={database}",
        "export WEBHOOK_STANDARD_SECRETS=whsec_...": f"export WEBHOOK_STANDARD_SECRETS={standard}",
        "export WEBHOOK_MERCADOPAGO_SECRETS=...": f"export WEBHOOK_MERCADOPAGO_SECRETS={mercadopago}",
        # serve runs in the foreground until Ctrl-C: here in the background, and the next block waits for /readyz
        # the way a person waits for uvicorn's start line before typing the next command
        "payment-webhook serve   ": "payment-webhook serve & ",
        "http://127.0.0.1:8080": f"http://127.0.0.1:{port}",  # 8080 may be taken: WEBHOOK_PORT below
    }
    run_it = block("payment-webhook/README.md", "export DATABASE_URL=postgresql://...           #")
    send = block("payment-webhook/README.md", "payment-webhook send-test-event")
    for old, new in substitutions.items():
        assert old in run_it + send, f"the README no longer has {old!r}: update this test's substitutions"
        run_it, send = run_it.replace(old, new), send.replace(old, new)
    ready = wait_ready(port)
    env = clean_env(WEBHOOK_PORT=str(port), WEBHOOK_LOG_FORMAT="json")
    process, out = run_script(run_it + ready + send, env, tmp_path / "out.log")
    try:
        assert process.returncode == 0, out[-3000:]
        expected = re.search(r'# (200 \{"status":"accepted","event_id":"msg_test_)', send)
        assert expected, "the README shows the answer send-test-event prints"
        assert expected.group(1) in out.replace('": "', '":"').replace('", "', '","'), out[-3000:]
        with psycopg.connect(database) as conn:
            row = conn.execute("SELECT count(*) FROM webhook.events WHERE outcome = 'accepted'").fetchone()
            assert row and row[0] == 1
            row = conn.execute("SELECT count(*) FROM pgmq.q_device_actions").fetchone()
            assert row and row[0] == 1
    finally:
        kill_group(process)
    assert "Traceback" not in out, out[-3000:]


def test_wl_console_readme_run_it(database: str, tmp_path: Path) -> None:
    """The wl-console README's "Run it" block: migrate, a first admin, serve; the login page answers."""
    port = free_port()
    password = secrets.token_urlsafe(16)
    substitutions = {  # what changes in the block, and why
        "export DATABASE_URL=postgresql://...": f"export DATABASE_URL={database}",
        # the prompt needs a terminal; the README's alternative for scripts, the password on standard input
        "wl-console user add ana --role admin": f"printf '%s\\n' {password} | wl-console user add ana --role admin --password-stdin",
        # serve runs in the foreground until Ctrl-C: here in the background, then wait for /readyz
        "wl-console serve   ": "wl-console serve & ",
    }
    script = block("wl-console/README.md", "export DATABASE_URL=postgresql://...")
    for old, new in substitutions.items():
        assert old in script, f"the README no longer has {old!r}: update this test's substitutions"
        script = script.replace(old, new)
    env = clean_env(WL_CONSOLE_PORT=str(port), WL_CONSOLE_COOKIE_SECURE="false")  # 8090 may be taken; plain http
    process, out = run_script(script + wait_ready(port) + f"python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:{port}/readyz\").status)'\n", env, tmp_path / "out.log")
    try:
        assert process.returncode == 0, out[-3000:]
        assert out.rstrip().endswith("200"), out[-3000:]
        with psycopg.connect(database) as conn:
            row = conn.execute("SELECT count(*) FROM console.users WHERE username = 'ana'").fetchone()
            assert row and row[0] == 1
    finally:
        kill_group(process)
    assert "Traceback" not in out, out[-3000:]


def wait_port(port: int) -> str:
    """A shell line waiting until something listens on 127.0.0.1:``port``."""
    return (
        "python3 -c 'import socket, time\nfor _ in range(300):\n"
        f"    try: socket.create_connection((\"127.0.0.1\", {port})).close(); break\n"
        "    except OSError: time.sleep(0.1)'\n"
    )


def test_payment_webhook_readme_whole_flow_on_one_machine(database: str, tmp_path: Path) -> None:
    """The payment-webhook README's "whole flow" block: a signed payment.approved restores the suspended demo
    customer through the simulated router, the webhook and the worker."""
    router_port, webhook_port = free_port(), free_port()
    standard = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    script = block("payment-webhook/README.md", "export DATABASE_URL=postgresql://...  WL_SIM")
    substitutions = {  # what changes in the block, and why
        "DATABASE_URL=postgresql://...": f"DATABASE_URL={database}",
        "WEBHOOK_STANDARD_SECRETS=whsec_...": f"WEBHOOK_STANDARD_SECRETS={standard}",
        "9728": str(router_port),  # may be taken on a test machine
        # the next command needs the simulator listening: a person has seen its start line
        "--seed-demo &": "--seed-demo &\n" + wait_port(router_port),
        # send-test-event needs the server ready: a person has seen uvicorn's start line
        "payment-webhook serve &": "payment-webhook serve &\n" + wait_ready(webhook_port),
        # the worker takes a moment for the job: a person reads the answer first; here a wait for an idle queue
        "wl-workers service show": (
            "python3 -c 'import psycopg, time\nfor _ in range(300):\n"
            f"    with psycopg.connect(\"{database}\") as c:\n"
            "        if not c.execute(\"SELECT count(*) FROM pgmq.q_device_actions\").fetchone()[0]: break\n"
            "    time.sleep(0.1)'\n"
            "wl-workers service show"
        ),
    }
    for old, new in substitutions.items():
        assert old in script, f"the README no longer has {old!r}: update this test's substitutions"
        script = script.replace(old, new)
    # ports: 8080 may be taken (WEBHOOK_PORT, and WEBHOOK_URL for send-test-event); the worker's 9480 is off
    env = clean_env(WEBHOOK_PORT=str(webhook_port), WEBHOOK_URL=f"http://127.0.0.1:{webhook_port}", PG_WORKER_METRICS="false")
    process, out = run_script(script, env, tmp_path / "out.log", timeout=90)
    try:
        assert process.returncode == 0, out[-3000:]
    finally:
        kill_group(process)
    assert re.search(r'^200 \{"status":"accepted"', out, re.MULTILINE), out[-3000:]
    # the README's promise: active, and the address has left "morosos" (read from the simulated router)
    assert re.search(r"^applied\s+active", out, re.MULTILINE), out[-3000:]
    assert "10.20.0.13 is not in address-list morosos" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
