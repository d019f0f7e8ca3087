"""Settings: secrets from the environment or from files, several at once, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from payment_webhook import WebhookSettings


def test_secrets_from_env_and_files_several_active(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "mp"
    secret_file.write_text("file-secret-1\nfile-secret-2\n")
    monkeypatch.setenv("WEBHOOK_STANDARD_SECRETS", "whsec_c2VjcmV0LW9uZQ==, whsec_c2VjcmV0LXR3bw==")
    monkeypatch.setenv("WEBHOOK_MERCADOPAGO_SECRETS", "env-secret")
    monkeypatch.setenv("WEBHOOK_MERCADOPAGO_SECRETS_FILE", str(secret_file))
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@127.0.0.1/db")
    monkeypatch.setenv("WEBHOOK_MAX_BODY_BYTES", "1000")
    settings = WebhookSettings()
    assert [s.get_secret_value() for s in settings.standard_secret_list()] == ["whsec_c2VjcmV0LW9uZQ==", "whsec_c2VjcmV0LXR3bw=="]
    assert [s.get_secret_value() for s in settings.mercadopago_secret_list()] == ["env-secret", "file-secret-1", "file-secret-2"]
    assert settings.database_url == "postgresql://u@127.0.0.1/db"
    assert settings.max_body_bytes == 1000
    shown = repr(settings) + str(settings.model_dump())
    assert "env-secret" not in shown and "c2VjcmV0" not in shown


def test_a_missing_secret_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read WEBHOOK_MERCADOPAGO_SECRETS_FILE"):
        WebhookSettings(mercadopago_secrets_file=tmp_path / "absent")


def test_an_invalid_standard_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as info:
        WebhookSettings.model_validate({"standard_secrets": "whsec_"})
    assert "empty" in str(info.value)
