"""The observer fan-out: only overridden methods are called (they run for every job), failures are contained."""

from __future__ import annotations

from typing import Any

import pytest

from pg_worker._events import ObserverGroup, WakeupSource, WorkerObserver


def test_observer_group_calls_only_overridden_methods_and_survives_a_failing_observer(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    class Started(WorkerObserver):
        def job_started(self, job: Any, latency: float) -> None:
            seen.append(f"started {latency}")

    class Broken(WorkerObserver):
        def job_started(self, job: Any, latency: float) -> None:
            raise RuntimeError("observer bug")

    patched = WorkerObserver()
    patched.lease_lost = lambda queue, msg_id, operation: seen.append(f"lost {msg_id}")  # type: ignore[method-assign]
    group = ObserverGroup([Broken(), Started()])
    group.job_started(None, 0.1)  # type: ignore[arg-type]
    group.add(patched)  # added after the first dispatch: still called
    group.job_started(None, 0.5)  # type: ignore[arg-type]
    group.lease_lost("q", 7, "ack")
    group.wakeup("q", WakeupSource.NOTIFY)  # nobody overrides it: nothing happens
    assert seen == ["started 0.1", "started 0.5", "lost 7"]
    assert [r.message for r in caplog.records] == ["observer_failed", "observer_failed"]
