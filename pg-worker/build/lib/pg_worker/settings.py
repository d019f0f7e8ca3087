"""Service-level settings from the environment (``PG_WORKER_*`` and ``DATABASE_URL``)."""

from __future__ import annotations

import importlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._app import App
from ._config import WorkerConfig
from ._database import DEFAULT_DATA_DIR
from ._schedule import PollSchedule, parse_duration


class WorkerSettings(BaseSettings):
    """Every field is read from ``PG_WORKER_<FIELD>`` (upper case); ``database_url`` from ``DATABASE_URL``."""

    model_config = SettingsConfigDict(env_prefix="PG_WORKER_", extra="ignore", populate_by_name=True)

    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    listen_url: str | None = None
    app: str | None = None
    concurrency: int = 100
    listen: bool = True
    poll_interval: str = "60s"
    poll_windows: str = ""
    poll_timezone: str = "UTC"
    degraded_poll_interval: float = 5.0
    missed_wakeup_bound: float = 1.0
    shutdown_grace: float = 30.0
    auto_install: bool = True
    synchronous_commit: bool = False
    data_dir: Path = DEFAULT_DATA_DIR
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    worker_id: str | None = None
    metrics: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9480
    queue_stats_interval: float = 60.0

    @field_validator("database_url", "listen_url")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    def poll_schedule(self) -> PollSchedule:
        interval = None if self.poll_interval.strip().lower() in ("off", "none", "0") else parse_duration(self.poll_interval)
        return PollSchedule.parse(self.poll_windows, interval=interval, timezone=self.poll_timezone)

    def worker_config(self) -> WorkerConfig:
        config = WorkerConfig(
            concurrency=self.concurrency,
            listen=self.listen,
            poll=self.poll_schedule(),
            degraded_poll_interval=self.degraded_poll_interval,
            missed_wakeup_bound=self.missed_wakeup_bound,
            shutdown_grace=self.shutdown_grace,
            auto_install=self.auto_install,
            synchronous_commit=self.synchronous_commit,
        )
        return replace(config, worker_id=self.worker_id) if self.worker_id else config


def load_app(reference: str) -> App:
    """Import ``module:attribute`` (an :class:`App`, or a callable returning one)."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"app reference {reference!r} must look like 'package.module:app'")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import module {module_name!r}: {exc}") from exc
    try:
        target = getattr(module, attribute)
    except AttributeError as exc:
        raise ValueError(f"module {module_name!r} has no attribute {attribute!r}") from exc
    app = target() if callable(target) and not isinstance(target, App) else target
    if not isinstance(app, App):
        raise ValueError(f"{reference!r} is not a pg_worker.App (got {type(app).__name__})")
    return app
