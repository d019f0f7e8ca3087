"""Fixtures for the tunnel tests: root and wireguard-go/wg/ip are required (scripts/ci-system-packages)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pg_worker.testing import PgServer
from tests.e2e.tunnel import Tunnel, clean_stale
from tests.tools import require_root, require_tools

BIN = Path(sys.executable).parent
TEMPLATE = "e2e_template"


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


@pytest.fixture(scope="session")
def e2e_pg(tunnel_host: None) -> Iterator[PgServer]:
    """The session's embedded PostgreSQL: Unix socket only, so every namespace reaches it by path."""

    def migrate(url: str) -> None:  # what the compose "migrate" service runs
        env = {**os.environ, "DATABASE_URL": url}
        for command in (["pg-worker", "install"], ["wl-workers", "migrate"]):
            subprocess.run([str(BIN / command[0]), *command[1:]], env=env, check=True, capture_output=True, timeout=120)

    with PgServer.running() as server:
        server.template_database(TEMPLATE, migrate)
        yield server


@pytest.fixture
def e2e_db(e2e_pg: PgServer) -> Iterator[str]:
    with e2e_pg.clone(TEMPLATE, prefix="e2e") as url:
        yield url
