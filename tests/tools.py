"""System tools that some tests need (installed by scripts/ci-system-packages)."""

from __future__ import annotations

import os
import shutil

import pytest


def must_run() -> bool:
    """CI and root (who can install the tools) never skip; others may."""
    return bool(os.environ.get("CI")) or os.geteuid() == 0


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run as root: {why}")
        pytest.skip(f"needs root: {why}")


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    message = f"missing {', '.join(missing)}: run scripts/ci-system-packages (as root)"
    if must_run():
        pytest.fail(message)
    pytest.skip(message)
