"""The benchmark suite runs (``--quick``: small sizes, one run each). Figures are not asserted here: speed is
measured by ``./scripts/bench`` as ratios against same-run baselines, never in timed unit tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_benchmark_suite_runs_and_prints_every_figure(tmp_path: Path, pg_tmp_root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # its own embedded server
    env["TMPDIR"] = str(pg_tmp_root)  # where its server lives (see conftest.pg_tmp_root), checked for leaks
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(tmp_path / "results.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    for measure in (
        "drain 2,000 queued no-op jobs",
        "enqueue committed to handler start p50",
        "8 producers, 1 msg/txn: ours, no worker waiting",
        "send_batch of 1,000: ours, no worker waiting",
        "4 worker processes draining",
        "jobs run twice while their lease held",
        "worker RSS after",
        "worker transactions per minute",
        "ordinary job latency p50",
    ):
        assert measure in table, f"missing row: {measure}\n{table}"
    assert (tmp_path / "results.json").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_fault_soak_runs_and_prints_its_checks(pg_tmp_root: Path) -> None:
    """A short soak (15 s of load, a SIGKILL, backend terminations, one restart of its own server)."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["TMPDIR"] = str(pg_tmp_root)
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "soak", "--duration", "15"], cwd=REPO, env=env, capture_output=True, text=True, timeout=280
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for measure in ("jobs lost", "overlapping runs of one message", "runs started after their lease was lost", "latency p99, outside the restart window"):
        assert measure in result.stdout, f"missing row: {measure}\n{result.stdout}"
