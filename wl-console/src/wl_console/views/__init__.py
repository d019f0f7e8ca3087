"""One router per resource; each route declares its permission (see permissions.py)."""
