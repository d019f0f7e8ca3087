"""The A/B harness (bench/ab.py) proves which pg_worker each worker process ran, and refuses a run that did not
use the version under test (round 2's A/B compared the new code with itself through PYTHONPATH)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pg_worker
from bench import ab

PACKAGE = Path(pg_worker.__file__).parent


def _probe_marker(tmp_path: Path) -> int:
    """Import the probe's app the way `pg-worker run` does (cwd = its directory); the pid it recorded."""
    (tmp_path / "ab_probe_app.py").write_text(ab.APP_SOURCE)
    env = ab._worker_env("postgresql:///unused", tmp_path)
    env["PYTHONPATH"] = str(PACKAGE.parent)  # this checkout's pg_worker (the test venv has it editable)
    done = subprocess.run(
        [sys.executable, "-c", "import os, ab_probe_app; print(os.getpid())"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip())


def test_the_probe_reports_the_package_it_imported_and_the_harness_accepts_it(tmp_path: Path) -> None:
    pid = _probe_marker(tmp_path)
    variant = ab.Variant("x", "x", "x", venv=PACKAGE.parent, digest=ab.package_digest(PACKAGE))
    ab._check_ran(variant, tmp_path, pid)  # the same file and the same sources: accepted


def test_a_worker_that_imported_another_pg_worker_is_refused(tmp_path: Path) -> None:
    pid = _probe_marker(tmp_path)
    elsewhere = ab.Variant("old", "old", "old", venv=tmp_path / "venv", digest=ab.package_digest(PACKAGE))
    with pytest.raises(RuntimeError, match="not the venv"):
        ab._check_ran(elsewhere, tmp_path, pid)
    other_code = ab.Variant("old", "old", "old", venv=PACKAGE.parent, digest="0" * 64)
    with pytest.raises(RuntimeError, match="digest"):
        ab._check_ran(other_code, tmp_path, pid)


def test_the_worker_environment_carries_no_pythonpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.setenv("PG_WORKER_CONCURRENCY", "3")
    env = ab._worker_env("postgresql:///db", tmp_path)
    assert "PYTHONPATH" not in env
    assert not any(key.startswith("PG_WORKER_") and key != "PG_WORKER_METRICS_PORT" for key in env)
    assert env["DATABASE_URL"] == "postgresql:///db"
    assert os.environ["PYTHONPATH"] == "/somewhere/else"  # the caller's environment is left alone
