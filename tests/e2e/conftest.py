"""Fixtures for the tunnel tests: root and wireguard-go/wg/ip are required (scripts/ci-system-packages)."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.tunnel import Tunnel, clean_stale
from tests.tools import require_root, require_tools

BIN = Path(sys.executable).parent
TEMPLATE = "e2e_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def tunnel_host() -> None:
    require_root("network namespaces and WireGuard interfaces")
    require_tools("ip", "wg", "wg-quick", "wireguard-go")
    clean_stale()


@pytest.fixture
def tunnel(tunnel_host: None, tmp_path: Path) -> Iterator[Tunnel]:
    t = Tunnel(tmp_path)
    try:
        t.open()
        yield t
    finally:
        t.close()


class E2ePg:
    """The session's embedded PostgreSQL: Unix socket only, so every namespace reaches it by path."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def url(self, database: str) -> str:
        return str(self.handle.get_uri(database=database))

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url("postgres"), autocommit=True)


@pytest.fixture(scope="session")
def e2e_pg(tunnel_host: None) -> Iterator[E2ePg]:
    from pg_worker._database import start_embedded

    # our own directory: pytest's numbered tmp dirs may be pruned by concurrent runs of other checkouts
    base = Path(tempfile.mkdtemp(prefix="wl-e2e-pg-"))
    server = E2ePg(start_embedded(base / "data", cleanup="delete"))
    with server.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    # what the compose "migrate" service runs
    env = {**os.environ, "DATABASE_URL": server.url(TEMPLATE)}
    for command in (["pg-worker", "install"], ["wl-workers", "migrate"]):
        subprocess.run([str(BIN / command[0]), *command[1:]], env=env, check=True, capture_output=True, timeout=120)
    yield server
    server.handle.cleanup()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def e2e_db(e2e_pg: E2ePg) -> Iterator[str]:
    name = f"e2e_{os.getpid()}_{next(_counter)}"
    with e2e_pg.admin() as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield e2e_pg.url(name)
    with e2e_pg.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
