"""wl-console's fixtures live in console_fixtures.py (a uniquely named module, so mypy can check it beside the
other packages' conftest modules)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from console_fixtures import cheap_argon2, console, console_db, console_pg

__all__ = ["cheap_argon2", "console", "console_db", "console_pg"]
