"""Who may do what: one ``StrEnum`` of ``<resource>:<action>`` permissions and one table role -> permissions.

Every route declares the one permission it needs (``dependencies=[Depends(require(...))]``, see app.py); a test
pins this table and checks that every route of the app declares a permission or is listed as public.
"""

from __future__ import annotations

from enum import StrEnum


class Permission(StrEnum):
    CUSTOMERS_READ = "customers:read"
    CUSTOMERS_ACT = "customers:act"  # activate, deactivate, refresh from the router
    ROUTERS_READ = "routers:read"
    ROUTERS_TEST = "routers:test"
    PAYMENTS_READ = "payments:read"
    QUEUES_READ = "queues:read"
    DEAD_LETTERS_REPLAY = "dead_letters:replay"
    DEAD_LETTERS_PURGE = "dead_letters:purge"
    SESSION = "session:own"  # log out: any signed-in user


ROLES = ("viewer", "operator", "admin")

_READ = frozenset({Permission.CUSTOMERS_READ, Permission.ROUTERS_READ, Permission.PAYMENTS_READ, Permission.QUEUES_READ, Permission.SESSION})
_OPERATE = _READ | {Permission.CUSTOMERS_ACT, Permission.ROUTERS_TEST, Permission.DEAD_LETTERS_REPLAY}

ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    "viewer": _READ,
    "operator": _OPERATE,
    # purging a dead letter loses the job for good: admins only
    "admin": _OPERATE | {Permission.DEAD_LETTERS_PURGE},
}


def permissions_of(role: str) -> frozenset[Permission]:
    """An unknown role (a row edited by hand) gets nothing."""
    return ROLE_PERMISSIONS.get(role, frozenset())
