"""What a worker runs: queues, their handlers and settings, and readiness checks that services add."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import pydantic

from ._names import validate_queue_name
from ._retry import RetryPolicy

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

P = TypeVar("P")

HandlerFunc = Callable[["Job[Any]"], Awaitable[None] | None]
LifespanFunc = Callable[["App"], AsyncIterator[None]]
BackgroundTaskFunc = Callable[["App"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Readiness:
    """What a readiness check may return instead of a bare ``bool``: ``reason`` is shown in ``/readyz``'s JSON
    and logged when it changes (so keep it stable: no timings that differ on every probe)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


ReadinessCheck = Callable[[], Awaitable[bool | Readiness] | bool | Readiness]


class WorkerFailure(Exception):
    """The worker cannot go on: raised by a readiness check, a lifespan or a background task.

    The worker stops gracefully (running jobs finish within the grace period, the rest are handed back), logs
    the reason, and ``Worker.run()`` then raises this exception (``pg-worker run`` exits with status 1), so
    that a supervisor restarts it. :meth:`Worker.stop` with ``failure=`` does the same from code.
    """


@dataclass(frozen=True, slots=True)
class Job(Generic[P]):
    """One delivery of a message to a handler.

    ``attempt`` is pgmq's ``read_ct`` (1 on the first delivery). Delivery is at-least-once: a handler may see
    the same message again after a crash or a lost acknowledgement, so handlers must be idempotent.
    """

    queue: str
    msg_id: int
    attempt: int
    enqueued_at: datetime
    payload: P
    type: str | None = None
    headers: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class QueueConfig:
    """How one queue is consumed.

    ``visibility_timeout`` is the lease (seconds) a read takes on a message; a job still running at half of
    it gets it renewed, until ``job_timeout`` seconds, after which the job is cancelled and counts as failed.
    ``batch_size`` (messages per read) defaults to half the worker's concurrency, at most 100.
    """

    name: str
    visibility_timeout: int = 30
    job_timeout: float = 600.0
    batch_size: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    on_success: Literal["delete", "archive"] = "delete"

    def __post_init__(self) -> None:
        validate_queue_name(self.name)
        if self.visibility_timeout < 1:
            raise ValueError(f"queue {self.name}: visibility_timeout must be >= 1 second")
        if self.job_timeout <= 0:
            raise ValueError(f"queue {self.name}: job_timeout must be > 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"queue {self.name}: batch_size must be >= 1")
        if self.on_success not in ("delete", "archive"):
            raise ValueError(f"queue {self.name}: on_success must be 'delete' or 'archive'")


class BadMessage(Exception):
    """A message no handler can ever accept: it goes to the dead-letter queue at once."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Handler:
    queue: str
    func: HandlerFunc
    job_type: str | None = None
    schema: type[pydantic.BaseModel] | None = None

    @functools.cached_property
    def is_async(self) -> bool:
        """Runs on the event loop: a coroutine function, a partial of one, or an object with ``async __call__``.

        Anything else runs in a thread; if it returns an awaitable after all (a lambda around an async
        function), that is awaited on the loop, never acknowledged unrun.
        """
        return inspect.iscoroutinefunction(_unwrap(self.func))

    @property
    def name(self) -> str:
        return _callable_name(self.func)

    def parse(self, message: dict[str, Any]) -> Any:
        if self.schema is None:
            return message
        try:
            return self.schema.model_validate(message)
        except pydantic.ValidationError as exc:
            raise BadMessage("invalid_payload", _short_validation_error(exc)) from exc


def _unwrap(func: Any) -> Any:
    """The function a handler really calls: through partials, and to ``__call__`` of an object."""
    while isinstance(func, functools.partial):
        func = func.func
    if not (inspect.isfunction(func) or inspect.ismethod(func)) and callable(func) and not isinstance(func, type):
        func = getattr(type(func), "__call__", func)  # noqa: B004 - the type's __call__, not callable()
    return func


def _refuse_results(handler: Any) -> None:
    """Refuse at registration a handler that says it returns something: a handler's return value is ignored
    (success is returning, failure is raising), so ``-> bool`` meant as "False = failed" would be taken for a
    success. A generator function is refused too: its body would never run."""
    func = _unwrap(handler)
    name = _callable_name(handler)
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(f"handler {name} is a generator function: calling it would not run its body")
    try:
        declared = typing.get_type_hints(func).get("return", None)
    except Exception:  # noqa: BLE001 - annotations we cannot resolve (a name only known to type checkers): not judged
        return
    origin = typing.get_origin(declared) or declared
    if declared is None or declared is type(None) or not isinstance(origin, type) or origin is object:
        return  # None, nothing declared, Any, a union or an unresolvable form: nothing to refuse
    if not inspect.iscoroutinefunction(func) and issubclass(origin, Awaitable):
        return  # a plain function that returns the coroutine doing the work
    raise TypeError(
        f"handler {name} declares it returns {getattr(declared, '__name__', declared)}; a handler's return value is "
        "ignored: return None for success and raise to fail (RetryLater, PermanentFailure or any exception)"
    )


def _callable_name(func: Any) -> str:
    return str(getattr(func, "__qualname__", None) or repr(func))


def _short_validation_error(exc: pydantic.ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5]]
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


class App:
    """The registry a worker serves: queues with their settings and handlers.

    >>> app = App()
    >>> @app.handler("emails")
    ... async def send_email(job: Job[dict[str, Any]]) -> None: ...
    """

    def __init__(self) -> None:
        self._queues: dict[str, QueueConfig] = {}
        self._handlers: dict[str, dict[str | None, Handler]] = {}
        self._readiness_checks: list[tuple[str, ReadinessCheck]] = []
        self._lifespans: list[LifespanFunc] = []
        self._background_tasks: dict[str, BackgroundTaskFunc] = {}
        self._collectors: list[Collector] = []
        #: Shared resources a lifespan opens (pools, clients) for handlers and background tasks to use.
        self.state = types.SimpleNamespace()

    # -- queues --------------------------------------------------------------------------------------------

    def queue(self, name: str, **settings: Any) -> QueueConfig:
        """Declare a queue (or change its settings); see :class:`QueueConfig` for the settings."""
        current = self._queues.get(name)
        config = replace(current, **settings) if current else QueueConfig(name=name, **settings)
        self._queues[name] = config
        self._handlers.setdefault(name, {})
        return config

    @property
    def queues(self) -> Mapping[str, QueueConfig]:
        return dict(self._queues)

    # -- handlers ------------------------------------------------------------------------------------------

    def add_handler(
        self,
        queue: str,
        func: HandlerFunc,
        *,
        type: str | None = None,
        schema: type[pydantic.BaseModel] | None = None,
    ) -> Handler:
        """Register ``func`` for ``queue``; with ``type``, only for messages whose ``type`` field matches.

        A handler without ``type`` takes every message of the queue that no typed handler claims.
        """
        if queue not in self._queues:
            self.queue(queue)
        by_type = self._handlers[queue]
        if type in by_type:
            what = f"type {type!r}" if type is not None else "the default"
            raise ValueError(f"queue {queue!r} already has a handler for {what}: {by_type[type].name}")
        if not callable(func):
            raise TypeError("handler must be callable")
        _refuse_results(func)
        handler = Handler(queue=queue, func=func, job_type=type, schema=schema)
        by_type[type] = handler
        return handler

    def handler(
        self, queue: str, *, type: str | None = None, schema: type[pydantic.BaseModel] | None = None
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator form of :meth:`add_handler`."""

        def register(func: HandlerFunc) -> HandlerFunc:
            self.add_handler(queue, func, type=type, schema=schema)
            return func

        return register

    def resolve(self, queue: str, message: Any) -> tuple[Handler, str | None]:
        """The handler for ``message`` and the message's type, or :class:`BadMessage`."""
        if not isinstance(message, dict):
            kind = "null" if message is None else type(message).__name__
            raise BadMessage("not_an_object", f"message must be a JSON object, got {kind}")
        by_type = self._handlers.get(queue, {})
        job_type = message.get("type")
        if job_type is not None and not isinstance(job_type, str):
            raise BadMessage("invalid_type", f"'type' must be a string, got {type(job_type).__name__}")
        handler = by_type.get(job_type) if job_type is not None else None
        if handler is None:
            handler = by_type.get(None)
        if handler is None:
            known = sorted(t for t in by_type if t is not None)
            raise BadMessage("unknown_type", f"no handler for type {job_type!r} on queue {queue!r} (known: {known})")
        return handler, job_type

    # -- health --------------------------------------------------------------------------------------------

    def readiness_check(self, name: str) -> Callable[[ReadinessCheck], ReadinessCheck]:
        """Register a check that must pass for the worker to report ready (e.g. "device network reachable")."""

        def register(check: ReadinessCheck) -> ReadinessCheck:
            self._readiness_checks.append((name, check))
            return check

        return register

    @property
    def readiness_checks(self) -> list[tuple[str, ReadinessCheck]]:
        return list(self._readiness_checks)

    # -- process resources -----------------------------------------------------------------------------------

    def lifespan(self, func: LifespanFunc) -> LifespanFunc:
        """Decorator: an async generator ``async def res(app: App)`` with one ``yield``, run once per worker run.

        The part before ``yield`` runs after the worker reached its database and before the first job (open a
        pool, put it on ``app.state``); the part after it runs after the last job finished or was handed back,
        and after the background tasks ended. Several lifespans are entered in the order registered and exited
        in reverse. A failure before ``yield`` ends the run before any job with :class:`WorkerFailure`.
        """
        if not inspect.isasyncgenfunction(func):
            raise TypeError(f"lifespan {_callable_name(func)} must be an async generator function (async def with one yield)")
        self._lifespans.append(func)
        return func

    @property
    def lifespans(self) -> list[LifespanFunc]:
        return list(self._lifespans)

    def background_task(self, name: str) -> Callable[[BackgroundTaskFunc], BackgroundTaskFunc]:
        """Decorator: ``async def task(app: App) -> None`` runs beside the jobs for the worker's life.

        It starts after the lifespans were entered, and is cancelled when the worker stops (before the jobs'
        grace period ends). Returning ends only the task. Raising (anything but ``CancelledError``; a
        :class:`WorkerFailure` says why) stops the worker gracefully with a failure.
        """

        def register(func: BackgroundTaskFunc) -> BackgroundTaskFunc:
            if name in self._background_tasks:
                raise ValueError(f"background task {name!r} is already registered")
            if not callable(func):
                raise TypeError("background task must be callable")
            self._background_tasks[name] = func
            return func

        return register

    @property
    def background_tasks(self) -> dict[str, BackgroundTaskFunc]:
        return dict(self._background_tasks)

    def add_collector(self, collector: Collector) -> None:
        """Serve a Prometheus collector (a metric, or a custom ``Collector``) in the worker's ``/metrics``."""
        if not callable(getattr(collector, "collect", None)):
            raise TypeError(f"{collector!r} is not a Prometheus collector (it has no collect())")
        self._collectors.append(collector)

    @property
    def collectors(self) -> list[Collector]:
        return list(self._collectors)

    def validate(self) -> None:
        """Refuse to start a worker that would read messages no handler can take."""
        if not self._queues:
            raise ValueError("the app declares no queues")
        empty = [name for name, handlers in self._handlers.items() if not handlers]
        if empty:
            raise ValueError(f"queues without handlers: {', '.join(sorted(empty))}")
