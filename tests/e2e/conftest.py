"""Fixtures for the tunnel tests: root and wireguard-go/wg/ip are required (scripts/ci-system-packages)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.tunnel import Tunnel, clean_stale
from tests.tools import require_root, require_tools


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
