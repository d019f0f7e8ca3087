"""Settings of the wl-workers service, from the environment (``WL_*``, plus the shared ``DATABASE_URL`` and the
Mercado Pago variables named in the payment contract)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .netcheck import NetcheckConfig, parse_targets, validate_interface_name

DEVICE_ACTIONS = "device_actions"
PAYMENT_SYNC = "payment_sync"
QUEUES = (DEVICE_ACTIONS, PAYMENT_SYNC)


class WlSettings(BaseSettings):
    """Every field is read from ``WL_<FIELD>``; the fields with an alias from the variable named there."""

    model_config = SettingsConfigDict(env_prefix="WL_", extra="ignore", populate_by_name=True)

    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    # WL_DATA_DIR, else pg-worker's PG_WORKER_DATA_DIR (what docs/operations.md tells operators to set)
    data_dir: Path = Field(default=Path(".data/postgres"), validation_alias=AliasChoices("WL_DATA_DIR", "PG_WORKER_DATA_DIR", "data_dir"))

    # device calls
    http_connect_timeout: float = Field(default=3.0, gt=0)
    http_read_timeout: float = Field(default=10.0, gt=0)
    busy_retry_delay: float = Field(default=2.0, ge=0)
    # how long one of a device's max_concurrent "next in line" jobs waits in its worker for a slot before parking
    device_wait: float = Field(default=1.0, ge=0)
    device_waiters: int = Field(default=4, ge=0)  # jobs per worker process that may wait so (the others park)

    # retry policy of device_actions: ~2 s doubling to 5 min; 12 attempts cover about half an hour of outage,
    # after which the job is dead-lettered and the periodic reconcile (if on) repairs the device later
    action_max_attempts: int = Field(default=12, ge=1)
    action_base_delay: float = Field(default=2.0, ge=0)
    action_max_delay: float = Field(default=300.0, ge=0)

    # per-device circuit breaker: after this many consecutive transient failures, jobs for the device park (no
    # attempt used) while one probe at a time tries it every probe interval; the first success wakes them all
    breaker_threshold: int = Field(default=3, ge=1)
    breaker_probe_interval: float = Field(default=0.5, gt=0)
    park_delay: float = Field(default=60.0, gt=0)  # a parked job's own retry, should nothing wake it earlier

    # periodic reconcile inside `wl-workers run` (seconds, +-10 % jitter; 0 = off)
    reconcile_interval: float = Field(default=600.0, ge=0)
    reconcile_concurrency: int = Field(default=4, ge=1)  # devices read at once
    reconcile_device_budget: float = Field(default=60.0, gt=0)  # seconds one device may take in a pass
    # the wl_services_diverged gauge: counted every so many seconds; a desired state not applied after the grace counts
    diverged_interval: float = Field(default=60.0, gt=0)
    diverged_grace: float = Field(default=300.0, ge=0)

    # wl.service_history rows older than this are deleted by `wl-workers history prune` and the periodic reconcile
    history_retention_days: float = Field(default=400.0, gt=0)

    # payments.sync
    mercadopago_api_base_url: str = Field(default="https://api.mercadopago.com", validation_alias="MERCADOPAGO_API_BASE_URL")
    mercadopago_access_token: SecretStr | None = Field(default=None, validation_alias="MERCADOPAGO_ACCESS_TOKEN")
    payment_max_attempts: int = Field(default=10, ge=1)
    payment_base_delay: float = Field(default=5.0, ge=0)


    # device-network self-check inside `wl-workers run` (off unless an interface or targets are set)
    netcheck_interface: str | None = None
    netcheck_targets: str = ""  # host:port[,host:port...]
    netcheck_interval: float = Field(default=10.0, gt=0)
    netcheck_exit_after: float = Field(default=60.0, ge=0)  # 0 = never exit, readiness only
    netcheck_timeout: float = Field(default=3.0, gt=0)
    # route guard (wl_workers/route_guard.py): refuse a router call unless the kernel routes it through this
    # interface. Read by the driver from WL_REQUIRE_ROUTE_VIA; declared here so a bad name stops `run` at start.
    require_route_via: str | None = None

    @field_validator("netcheck_interface", "require_route_via")
    @classmethod
    def _interface_name(cls, value: str | None) -> str | None:
        value = value.strip() if value is not None else None
        return validate_interface_name(value) if value else None

    @field_validator("netcheck_targets")
    @classmethod
    def _targets(cls, value: str) -> str:
        parse_targets(value)
        return value

    def netcheck(self) -> NetcheckConfig | None:
        """The device-network check's configuration, or None when neither an interface nor targets are set."""
        targets = parse_targets(self.netcheck_targets)
        if self.netcheck_interface is None and not targets:
            return None
        return NetcheckConfig(
            interface=self.netcheck_interface, targets=targets, interval=self.netcheck_interval,
            exit_after=self.netcheck_exit_after, connect_timeout=self.netcheck_timeout,
        )  # fmt: skip

    @field_validator("database_url")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("mercadopago_api_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")


SECRET_VARIABLES = {"DATABASE_URL", "MERCADOPAGO_ACCESS_TOKEN"}


def settings_error(exc: ValidationError) -> str:
    """One line naming each bad environment variable (never a pydantic dump, never a secret's value)."""
    problems = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        info = WlSettings.model_fields.get(field) if exc.title == WlSettings.__name__ else None
        prefix = "WL_" if exc.title == WlSettings.__name__ else "PG_WORKER_"  # `run` also reads pg-worker's settings
        variable = field if field.isupper() else f"{prefix}{field.upper()}"
        if info is not None and isinstance(info.validation_alias, str):
            variable = info.validation_alias
        value = error.get("input")
        shown = f"={value}" if isinstance(value, str) and variable not in SECRET_VARIABLES and len(value) <= 80 else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{variable}{shown}: {message}")
    return "bad settings: " + "; ".join(problems)
