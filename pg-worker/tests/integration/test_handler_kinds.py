"""Every kind of handler gets the same limits (issue 18 item 2): a lambda or plain function returning a
coroutine, a partial of an async function and an object with ``async __call__`` are stopped at ``job_timeout``
and when their lease is lost, exactly like an ``async def``. And what a handler returns (item 7)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest

import pg_worker
from helpers import RecordingObserver, dlq_messages, expire, queue_rows, read_one, running_worker, wait_until
from pg_worker import App, Job, JobTimeout, Outcome, PollSchedule, Producer, RetryPolicy, WorkerConfig

Runs = list[tuple[str, float]]


async def _work(runs: Runs, job: Job[dict[str, Any]]) -> None:
    runs.append(("start", time.monotonic()))
    try:
        await asyncio.sleep(30)
    finally:
        runs.append(("end", time.monotonic()))


class _AsyncCallable:
    def __init__(self, runs: Runs) -> None:
        self.runs = runs

    async def __call__(self, job: Job[dict[str, Any]]) -> None:
        await _work(self.runs, job)


def _returns_coroutine(runs: Runs) -> Callable[[Job[dict[str, Any]]], Awaitable[None]]:
    def handler(job: Job[dict[str, Any]]) -> Awaitable[None]:  # a plain def (e.g. a decorator's wrapper)
        return _work(runs, job)

    return handler


def _async_def(runs: Runs) -> Callable[[Job[dict[str, Any]]], Awaitable[None]]:
    async def handler(job: Job[dict[str, Any]]) -> None:  # the reference the other kinds are compared with
        await _work(runs, job)

    return handler


KINDS: dict[str, Callable[[Runs], Any]] = {
    "async_def": lambda runs: _async_def(runs),
    "lambda": lambda runs: lambda job: _work(runs, job),
    "plain_def": _returns_coroutine,
    "partial": lambda runs: functools.partial(_work, runs),
    "async_call_object": _AsyncCallable,
}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_every_handler_kind_is_cancelled_at_its_job_timeout(db_url: str, producer: Producer, kind: str) -> None:
    runs: Runs = []
    app = App()
    app.queue("jobs", job_timeout=1.0, retry=RetryPolicy(max_attempts=3, base_delay=60))
    app.add_handler("jobs", KINDS[kind](runs))
    await pg_worker.install(db_url, ["jobs"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, worker_id=f"timeout-{kind}"):
        producer.enqueue("jobs", {})
        await wait_until(lambda: observer.finished, timeout=15, what="the job's end")
    [finished] = observer.finished
    assert finished.outcome is Outcome.RETRIED and isinstance(finished.error, JobTimeout), finished
    (_, started), (end, ended) = runs
    assert end == "end" and ended - started < 5, "cancelled at its timeout, not after its 30 s of work"


@pytest.mark.parametrize("kind", list(KINDS))
async def test_every_handler_kind_is_cancelled_when_its_lease_is_lost(db_url: str, producer: Producer, kind: str) -> None:
    runs: Runs = []
    app = App()
    app.queue("long", visibility_timeout=2)
    app.add_handler("long", KINDS[kind](runs))
    await pg_worker.install(db_url, ["long"])
    observer = RecordingObserver()
    async with running_worker(app, db_url, observer, poll=PollSchedule(interval=600), worker_id=f"lease-{kind}"):
        producer.enqueue("long", {})
        await wait_until(lambda: runs, timeout=15, what="the job's start")
        # Another worker takes the message over (as after a network split): the next renewal matches nothing.
        await expire(db_url, "long")
        await read_one(db_url, "long", vt=300)
        await wait_until(lambda: observer.outcomes(Outcome.LEASE_LOST), timeout=10, what="the job stopped")
        await wait_until(lambda: len(runs) == 2, timeout=5, what="the handler's own cleanup")
    assert [what for what, _ in runs] == ["start", "end"], "cancelled, never acknowledged"
    assert [f.outcome for f in observer.finished] == [Outcome.LEASE_LOST]
    [(_, read_ct, _, _)] = await queue_rows(db_url, "long")
    assert read_ct == 2, "the other worker's delivery is intact"


# -- return values (issue 18 item 7): refused at registration when declared, ignored (and warned) otherwise ---------


class _ReturnsDict:
    def __call__(self, job: Job[dict[str, Any]]) -> dict[str, Any]:
        return {}


def test_handlers_that_declare_a_return_value_or_are_generators_are_refused_at_registration() -> None:
    def as_bool(job: Job[dict[str, Any]]) -> bool:
        return True

    async def as_int(job: Job[dict[str, Any]]) -> int:
        return 1

    def generator(job: Job[dict[str, Any]]) -> Iterator[None]:
        yield

    async def async_generator(job: Job[dict[str, Any]]) -> AsyncIterator[None]:
        yield

    app = App()
    for refused, why in (
        (as_bool, "declares it returns bool"),
        (as_int, "declares it returns int"),
        (functools.partial(as_bool), "declares it returns bool"),
        (_ReturnsDict(), "declares it returns dict"),
        (generator, "generator function"),
        (async_generator, "generator function"),
    ):
        with pytest.raises(TypeError, match=why):
            app.add_handler("jobs", refused)  # type: ignore[arg-type]

    def returns_none(job: Job[dict[str, Any]]) -> None: ...

    def returns_awaitable(job: Job[dict[str, Any]]) -> Awaitable[None]:
        return asyncio.sleep(0)

    def returns_coroutine(job: Job[dict[str, Any]]) -> Coroutine[Any, Any, None]:
        return asyncio.sleep(0)

    async def async_none(job: Job[dict[str, Any]]) -> None: ...

    def unannotated(job):  # type: ignore[no-untyped-def]
        return None

    for i, accepted in enumerate((returns_none, returns_awaitable, returns_coroutine, async_none, unannotated, lambda job: None)):
        app.add_handler("jobs", accepted, type=str(i))


async def test_a_value_returned_anyway_is_ignored_with_one_warning_and_the_job_succeeds(
    db_url: str, producer: Producer, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler did its work and returned: not dead-lettered (a replay would do the work twice)."""
    done: list[int] = []

    def handle(job: Job[dict[str, Any]]):  # type: ignore[no-untyped-def]
        done.append(job.msg_id)
        return "ok"

    app = App()
    app.add_handler("jobs", handle)
    await pg_worker.install(db_url, ["jobs"])
    producer.enqueue("jobs", {})
    producer.enqueue("jobs", {})
    observer = RecordingObserver()
    await pg_worker.run_worker(app, db_url, WorkerConfig(listen=False), observers=[observer], stop_when_idle=True)
    assert sorted(done) == [1, 2]
    assert [f.outcome for f in observer.finished] == [Outcome.SUCCEEDED] * 2
    assert await queue_rows(db_url, "jobs") == [] and await dlq_messages(db_url, "jobs") == []
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "handler_returned_value"]
    assert len(warnings) == 1 and warnings[0].type == "str"  # type: ignore[attr-defined]
