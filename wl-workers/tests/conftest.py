"""wl-workers' fixtures live in wl_fixtures.py (a uniquely named module, so mypy can check it beside
pg-worker's conftest)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from wl_fixtures import cli, router_password, sim, wl_db, wl_empty_db, wl_pg

__all__ = ["cli", "router_password", "sim", "wl_db", "wl_empty_db", "wl_pg"]
