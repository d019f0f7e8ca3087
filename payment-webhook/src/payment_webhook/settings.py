"""Service settings from the environment: ``WEBHOOK_*`` (and ``DATABASE_URL``).

Secrets come from the environment or from files (``*_FILE``, for Docker/Kubernetes secrets), never from the
repository. Several secrets may be active at once, so a provider's key can be rotated without a gap: list them
separated by commas or whitespace (in a file, one per line). They are kept as ``SecretStr``, the database URL is
left out of ``repr``, and validation errors never carry input values, so no repr, log line or error shows them.

A secret that cannot be a real one is refused at start-up, naming the variable and never the value: a Standard
Webhooks key shorter than 24 bytes (the specification's secrets are 24-64 random bytes) or not strict base64, a
Mercado Pago secret shorter than 24 characters, and the placeholders of example files (``change-me`` ...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_SEPARATORS = re.compile(r"[\s,]+")

MIN_STANDARD_KEY_BYTES = 24
MIN_MERCADOPAGO_SECRET_CHARS = 24
# Words that mark an example value. Matched in the secret and, for whsec_ secrets, in the decoded key (a base64
# encoded "change-me-please..." is still a placeholder). A random secret holds none of them by chance.
_PLACEHOLDER = re.compile(r"change-?_?me|changeme|replace|placeholder|example|your[-_ ]?secret|secret[-_ ]?here|dummy|xxxx", re.IGNORECASE)
GENERATE_HINT = "generate one with: python3 -c 'import base64, secrets; print(\"whsec_\" + base64.b64encode(secrets.token_bytes(32)).decode())'"


def _split_secrets(raw: SecretStr | None, file: Path | None, what: str) -> tuple[tuple[SecretStr, str], ...]:
    """Each secret with the variable it came from (for error messages that name it, never the value)."""
    values: list[tuple[str, str]] = []
    if raw is not None:
        values.extend((v, what) for v in _SEPARATORS.split(raw.get_secret_value()))
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read {what}_FILE file {str(file)!r}: {exc.strerror}") from None
        values.extend((v, f"{what}_FILE") for v in _SEPARATORS.split(text))
    seen: dict[str, str] = {}
    for value, source in values:
        if value and value not in seen:
            seen[value] = source
    return tuple((SecretStr(v), source) for v, source in seen.items())


def _low_variety(value: bytes | str) -> bool:
    return len(set(value)) < 8  # "AAAA...", "aaaa...": long, and worthless as a key


def check_standard_secret(secret: str, source: str, position: int) -> None:
    from ._signatures import decode_standard_secret

    where = f"{source}: secret {position}"
    try:
        key = decode_standard_secret(secret)  # raises without echoing the secret
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}; {GENERATE_HINT}") from None
    if len(key) < MIN_STANDARD_KEY_BYTES:
        raise ValueError(f"{where}: the key is {len(key)} bytes, at least {MIN_STANDARD_KEY_BYTES} are needed; {GENERATE_HINT}")
    if _PLACEHOLDER.search(secret) or _PLACEHOLDER.search(key.decode("latin-1")) or _low_variety(key):
        raise ValueError(f"{where}: a placeholder, not a secret; {GENERATE_HINT}")


def check_mercadopago_secret(secret: str, source: str, position: int) -> None:
    where = f"{source}: secret {position}"
    if len(secret) < MIN_MERCADOPAGO_SECRET_CHARS:
        raise ValueError(
            f"{where}: {len(secret)} characters, at least {MIN_MERCADOPAGO_SECRET_CHARS} are needed "
            "(copy the application's secret signature from Mercado Pago's Your integrations > Webhooks)"
        )
    if _PLACEHOLDER.search(secret) or _low_variety(secret):
        raise ValueError(f"{where}: a placeholder, not a secret (copy the application's secret signature from Mercado Pago)")


class WebhookSettings(BaseSettings):
    """Every field is read from ``WEBHOOK_<FIELD>`` (upper case); ``database_url`` also from ``DATABASE_URL``."""

    # hide_input_in_errors: a refused secret (or a URL with its password) must not reappear in the error text.
    model_config = SettingsConfigDict(env_prefix="WEBHOOK_", extra="ignore", populate_by_name=True, hide_input_in_errors=True)

    database_url: str | None = Field(
        default=None, repr=False, validation_alias=AliasChoices("WEBHOOK_DATABASE_URL", "DATABASE_URL", "database_url")
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # /metrics on a port of its own (same host unless metrics_host says otherwise), e.g. reachable by Prometheus
    # only; unset: /metrics is served beside the webhooks.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str | None = None
    # Standard Webhooks (the ISP's billing system): "whsec_<base64>" secrets, several during a rotation.
    standard_secrets: SecretStr | None = None
    standard_secrets_file: Path | None = None
    standard_tolerance_seconds: float = Field(default=300.0, gt=0)
    # Mercado Pago: the application's webhook secret(s) and how old a signed ``ts`` may be.
    mercadopago_secrets: SecretStr | None = None
    mercadopago_secrets_file: Path | None = None
    mercadopago_replay_window_seconds: float = Field(default=300.0, gt=0)
    # An event's own time (billing's "timestamp", Mercado Pago's "date_created") must lie in this window around
    # the time it is received: a provider retries for up to 4 days; a clock a little ahead is tolerated.
    event_max_age_seconds: float = Field(default=7 * 86400.0, gt=0)
    event_max_ahead_seconds: float = Field(default=300.0, ge=0)
    max_body_bytes: int = Field(default=64 * 1024, ge=1)
    # Bounded resources: the whole body must arrive within body_timeout_seconds (a trickling client gets 408 and
    # is disconnected); idle keep-alive connections close after keep_alive_seconds; once max_connections
    # connections are open (or requests in flight, the new one counted), uvicorn answers 503 at once.
    body_timeout_seconds: float = Field(default=10.0, gt=0)
    keep_alive_seconds: int = Field(default=5, ge=1)
    max_connections: int = Field(default=200, ge=1)
    # A request that cannot get a database connection within this time answers 503 (the provider retries).
    db_timeout_seconds: float = Field(default=5.0, gt=0)
    # Per-transaction budget in the database (SET LOCAL statement_timeout / lock_timeout): a locked table or a
    # slow statement is a 503 long before the provider gives up (Mercado Pago: 22 s).
    db_statement_timeout_seconds: float = Field(default=5.0, gt=0)
    db_lock_timeout_seconds: float = Field(default=2.0, gt=0)
    # After a database outage, the pool retries connecting for at most this long before it gives the attempt up;
    # the next request or readiness probe starts a new attempt at once, so readiness returns as soon as the
    # database does (psycopg_pool's own backoff doubles without a cap: 45 s more after a 70 s outage).
    pool_reconnect_timeout_seconds: float = Field(default=1.5, gt=0)
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    # Retention of webhook.events: rows older than retention_days are deleted by the serve process every
    # prune_interval_seconds (0: never; then run `payment-webhook prune` from a timer).
    retention_days: int = Field(default=400, ge=1)
    prune_interval_seconds: float = Field(default=3600.0, ge=0)
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("database_url")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @model_validator(mode="after")
    def _check(self) -> WebhookSettings:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("pool_min_size must not exceed pool_max_size")
        # Our whole answer must come well inside the provider's deadline (Mercado Pago: 22 s).
        if self.db_timeout_seconds + self.db_statement_timeout_seconds > 20:
            raise ValueError("db_timeout_seconds + db_statement_timeout_seconds must stay under 20 s (Mercado Pago gives up after 22 s)")
        for n, (secret, source) in enumerate(self._standard(), 1):
            check_standard_secret(secret.get_secret_value(), source, n)
        for n, (secret, source) in enumerate(self._mercadopago(), 1):
            check_mercadopago_secret(secret.get_secret_value(), source, n)
        return self

    def _standard(self) -> tuple[tuple[SecretStr, str], ...]:
        return _split_secrets(self.standard_secrets, self.standard_secrets_file, "WEBHOOK_STANDARD_SECRETS")

    def _mercadopago(self) -> tuple[tuple[SecretStr, str], ...]:
        return _split_secrets(self.mercadopago_secrets, self.mercadopago_secrets_file, "WEBHOOK_MERCADOPAGO_SECRETS")

    def standard_secret_list(self) -> tuple[SecretStr, ...]:
        return tuple(secret for secret, _ in self._standard())

    def mercadopago_secret_list(self) -> tuple[SecretStr, ...]:
        return tuple(secret for secret, _ in self._mercadopago())
