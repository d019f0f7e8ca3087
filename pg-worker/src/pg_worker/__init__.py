"""pg-worker: a PGMQ worker that wakes on LISTEN/NOTIFY, retries, dead-letters and shuts down gracefully."""

from ._app import App, BadMessage, Handler, Job, QueueConfig, Readiness, WorkerFailure
from ._config import WorkerConfig
from ._database import redact_url, resolve_database_url, start_embedded
from ._events import ObserverGroup, Outcome, WakeupSource, WorkerObserver
from ._install import InstallReport, SetupError, check_setup, install
from ._names import InvalidQueueName, dlq_name, validate_queue_name
from ._producer import DEFAULT_MAX_DELAY, DEFAULT_MAX_MESSAGE_SIZE, AsyncProducer, MessageTooLarge, Producer
from ._retry import PermanentFailure, RetryLater, RetryPolicy
from ._schedule import InvalidSchedule, PollSchedule, PollWindow
from ._worker import JobTimeout, Worker, WorkerCrashed, WorkerHealth, run_worker

__all__ = [
    "DEFAULT_MAX_DELAY",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "App",
    "AsyncProducer",
    "BadMessage",
    "Handler",
    "InstallReport",
    "InvalidQueueName",
    "InvalidSchedule",
    "Job",
    "JobTimeout",
    "MessageTooLarge",
    "ObserverGroup",
    "Outcome",
    "PermanentFailure",
    "PollSchedule",
    "PollWindow",
    "Producer",
    "QueueConfig",
    "Readiness",
    "RetryLater",
    "RetryPolicy",
    "SetupError",
    "WakeupSource",
    "Worker",
    "WorkerConfig",
    "WorkerCrashed",
    "WorkerFailure",
    "WorkerHealth",
    "WorkerObserver",
    "check_setup",
    "dlq_name",
    "install",
    "redact_url",
    "resolve_database_url",
    "run_worker",
    "start_embedded",
    "validate_queue_name",
]
