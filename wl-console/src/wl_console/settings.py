"""Console settings from the environment: ``WL_CONSOLE_*`` (and ``DATABASE_URL``).

The session-signing key comes from the environment or a file (``WL_CONSOLE_SECRET_KEY_FILE``, for Docker
secrets), never from the repository; it is a ``SecretStr`` so that no repr, log line or validation error shows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_SECRET_KEY = 32  # characters; the key signs session and flash cookies (HMAC-SHA256)


class ConsoleSettings(BaseSettings):
    """Every field is read from ``WL_CONSOLE_<FIELD>``; ``database_url`` also from ``DATABASE_URL``."""

    model_config = SettingsConfigDict(env_prefix="WL_CONSOLE_", extra="ignore", populate_by_name=True)

    database_url: str | None = Field(default=None, validation_alias=AliasChoices("WL_CONSOLE_DATABASE_URL", "DATABASE_URL", "database_url"))
    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    secret_key: SecretStr | None = None
    secret_key_file: Path | None = None
    # Cookies carry the Secure flag unless explicitly turned off (plain http on 127.0.0.1 in development only).
    cookie_secure: bool = True
    session_idle_minutes: float = Field(default=30.0, gt=0)
    session_max_hours: float = Field(default=12.0, gt=0)
    # Login throttling: this many failures for one user name (or one client address, times 4) inside the window
    # refuse further tries until the window has passed, without even checking the password.
    login_max_failures: int = Field(default=5, ge=1)
    login_window_seconds: float = Field(default=900.0, gt=0)
    page_size: int = Field(default=50, ge=5, le=500)
    max_form_bytes: int = Field(default=64 * 1024, ge=1024)
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
    def _check(self) -> ConsoleSettings:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("pool_min_size must not exceed pool_max_size")
        return self

    def signing_key(self) -> bytes:
        """The key that signs cookies; a clear error (without the key) when it is missing or too short."""
        value: str | None = self.secret_key.get_secret_value() if self.secret_key is not None else None
        if value is None and self.secret_key_file is not None:
            try:
                value = self.secret_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read WL_CONSOLE_SECRET_KEY_FILE {str(self.secret_key_file)!r}: {exc.strerror}") from None
        if not value:
            raise ValueError("no session key: set WL_CONSOLE_SECRET_KEY (or WL_CONSOLE_SECRET_KEY_FILE) to 32+ random characters")
        if "change-me" in value.lower():  # the example file's placeholder: public, so anyone could sign a session
            raise ValueError("the session key is the example's placeholder: set WL_CONSOLE_SECRET_KEY to 32+ random characters")
        if len(value) < MIN_SECRET_KEY:
            raise ValueError(f"the session key must be at least {MIN_SECRET_KEY} characters long (it is {len(value)})")
        return value.encode()
