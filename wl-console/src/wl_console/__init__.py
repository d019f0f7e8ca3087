"""wl-console: the operator's web console over the database (customers, routers, payments, queues)."""

from ._migrate import MigrationError, migrate
from .app import create_app
from .permissions import ROLE_PERMISSIONS, Permission
from .settings import ConsoleSettings

__all__ = ["ROLE_PERMISSIONS", "ConsoleSettings", "MigrationError", "Permission", "create_app", "migrate"]
