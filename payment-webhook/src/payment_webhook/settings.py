"""Service settings from the environment: ``WEBHOOK_*`` (and ``DATABASE_URL``).

Secrets come from the environment or from files (``*_FILE``, for Docker/Kubernetes secrets), never from the
repository. Several secrets may be active at once, so a provider's key can be rotated without a gap: list them
separated by commas or whitespace (in a file, one per line). They are kept as ``SecretStr`` so that no repr, log
line or validation error shows them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_SEPARATORS = re.compile(r"[\s,]+")


def _split_secrets(raw: SecretStr | None, file: Path | None, what: str) -> tuple[SecretStr, ...]:
    values: list[str] = []
    if raw is not None:
        values.extend(_SEPARATORS.split(raw.get_secret_value()))
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read {what} file {str(file)!r}: {exc.strerror}") from None
        values.extend(_SEPARATORS.split(text))
    return tuple(SecretStr(v) for v in dict.fromkeys(values) if v)


class WebhookSettings(BaseSettings):
    """Every field is read from ``WEBHOOK_<FIELD>`` (upper case); ``database_url`` also from ``DATABASE_URL``."""

    model_config = SettingsConfigDict(env_prefix="WEBHOOK_", extra="ignore", populate_by_name=True)

    database_url: str | None = Field(default=None, validation_alias=AliasChoices("WEBHOOK_DATABASE_URL", "DATABASE_URL", "database_url"))
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Standard Webhooks (the ISP's billing system): "whsec_<base64>" secrets, several during a rotation.
    standard_secrets: SecretStr | None = None
    standard_secrets_file: Path | None = None
    standard_tolerance_seconds: float = Field(default=300.0, gt=0)
    # Mercado Pago: the application's webhook secret(s) and how old a signed ``ts`` may be.
    mercadopago_secrets: SecretStr | None = None
    mercadopago_secrets_file: Path | None = None
    mercadopago_replay_window_seconds: float = Field(default=300.0, gt=0)
    max_body_bytes: int = Field(default=64 * 1024, ge=1)
    # A request that cannot get a database connection within this time answers 503 (the provider retries).
    db_timeout_seconds: float = Field(default=5.0, gt=0)
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
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
        for secret in self.standard_secret_list():
            _check_standard_secret(secret.get_secret_value())
        self.mercadopago_secret_list()  # a missing file is reported at start-up, not on the first request
        return self

    def standard_secret_list(self) -> tuple[SecretStr, ...]:
        return _split_secrets(self.standard_secrets, self.standard_secrets_file, "WEBHOOK_STANDARD_SECRETS_FILE")

    def mercadopago_secret_list(self) -> tuple[SecretStr, ...]:
        return _split_secrets(self.mercadopago_secrets, self.mercadopago_secrets_file, "WEBHOOK_MERCADOPAGO_SECRETS_FILE")


def _check_standard_secret(secret: str) -> None:
    from ._signatures import decode_standard_secret

    decode_standard_secret(secret)  # raises ValueError without echoing the secret
