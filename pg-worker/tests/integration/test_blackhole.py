"""A network path that stops relaying (a cut VPN, a blackholed route) between one worker and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import time
from collections.abc import AsyncIterator
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pg_worker
from helpers import RecordingObserver, running_worker, wait_until
from pg_worker import App, Job, Outcome, PollSchedule, Producer
from pg_worker.health import HealthProbe


class BlackholeProxy:
    """TCP on 127.0.0.1 in front of PostgreSQL's Unix socket; ``blackhole()`` stops relaying in both directions
    while every connection stays open (no FIN, no RST), as a dead route does."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._open = asyncio.Event()
        self._open.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def blackhole(self) -> None:
        self._open.clear()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                await self._open.wait()
                writer.write(data)
                await writer.drain()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.socket_path)
        self._writers += [writer, up_writer]
        for pipe in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[BlackholeProxy]:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self.server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for writer in self._writers:
                writer.close()


def _through(proxy: BlackholeProxy, db_url: str) -> str:
    params = conninfo_to_dict(db_url)
    return make_conninfo(host="127.0.0.1", port=str(proxy.port), dbname=str(params["dbname"]), user=str(params["user"]))


async def test_a_blackholed_worker_stops_its_job_before_another_starts_it_and_health_says_so(db_url: str, producer: Producer) -> None:
    [socket_path] = [p for p in glob.glob(str(conninfo_to_dict(db_url)["host"]) + "/.s.PGSQL.*") if not p.endswith(".lock")]
    app = App()
    app.queue("long", visibility_timeout=4)
    spans: dict[str, list[float]] = {}

    @app.handler("long")
    async def handle(job: Job[dict[str, Any]]) -> None:
        me = asyncio.current_task().get_name()  # type: ignore[union-attr]
        spans[me] = [time.monotonic()]
        try:
            await asyncio.sleep(60)
        finally:
            spans[me].append(time.monotonic())

    await pg_worker.install(db_url, ["long"])
    settings: dict[str, Any] = {"poll": PollSchedule(interval=0.2), "stall_bound": 1.0, "statement_timeout": 2.0, "pool_timeout": 2.0, "shutdown_grace": 0.2}
    observer_a = RecordingObserver()
    async with BlackholeProxy(socket_path).running() as proxy, running_worker(app, _through(proxy, db_url), observer_a, worker_id="a", **settings) as a:
        producer.enqueue("long", {})
        await wait_until(lambda: spans, what="A runs the job")
        probe = HealthProbe(a, check_timeout=1.0)
        proxy.blackhole()
        cut = time.monotonic()
        alive: list[bool] = []
        ready: list[bool] = []

        async def sample_liveness() -> None:
            while True:
                alive.append(probe.liveness().ok)
                await asyncio.sleep(0.02)

        async def sample_readiness() -> None:
            while True:
                ready.append((await probe.readiness()).ok)
                await asyncio.sleep(0.05)

        samplers = [asyncio.create_task(sample_liveness()), asyncio.create_task(sample_readiness())]
        try:
            async with running_worker(app, db_url, RecordingObserver(), worker_id="b", **settings):
                await wait_until(lambda: len(spans) == 2, timeout=10, what="B runs the job after A's lease")
                await wait_until(lambda: not all(ready), timeout=5, what="A not ready")
        finally:
            for task in samplers:
                task.cancel()
        assert time.monotonic() - cut < 10
        assert observer_a.outcomes(Outcome.LEASE_LOST), "A stopped its job: its lease could not be renewed"
        a_span, b_span = sorted(spans.values())
        assert len(a_span) == 2, "A's run ended (cancelled)"
        assert a_span[1] < b_span[0], "the job never ran on both workers at once"
        assert not all(alive), "liveness failed while the lease keeper could not make progress"
        assert not all(ready), "readiness failed while the database could not be reached"
