"""payment-webhook's fixtures live in webhook_fixtures.py (a uniquely named module, so mypy can check it beside
the other packages' conftest modules)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from webhook_fixtures import blank_db, db, webhook_db, webhook_pg, webhook_server

__all__ = ["blank_db", "db", "webhook_db", "webhook_pg", "webhook_server"]
