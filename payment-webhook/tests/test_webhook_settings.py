"""Settings: secrets from the environment or from files, several at once, never shown; weak ones refused."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pydantic import ValidationError

from payment_webhook import WebhookSettings

# Made up for these tests (never real keys): 32 random-looking bytes each.
STD_1 = "whsec_" + base64.b64encode(bytes(range(7, 39))).decode()
STD_2 = "whsec_" + base64.b64encode(bytes(range(101, 133))).decode()
MP_1 = "5e0c8a2f7b1d4e96a3c0f8b2d7e15a4c"
MP_FILE_1 = "9b7d1f3e5a2c4e6f8a0b2d4f6e8a0c1d"
MP_FILE_2 = "c3e5a7f9b1d3f5a7c9e1b3d5f7a9c2e4"


def test_secrets_from_env_and_files_several_active(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "mp"
    secret_file.write_text(f"{MP_FILE_1}\n{MP_FILE_2}\n")
    monkeypatch.setenv("WEBHOOK_STANDARD_SECRETS", f"{STD_1}, {STD_2}")
    monkeypatch.setenv("WEBHOOK_MERCADOPAGO_SECRETS", MP_1)
    monkeypatch.setenv("WEBHOOK_MERCADOPAGO_SECRETS_FILE", str(secret_file))
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:db-password-42@127.0.0.1/db")
    monkeypatch.setenv("WEBHOOK_MAX_BODY_BYTES", "1000")
    settings = WebhookSettings()
    assert [s.get_secret_value() for s in settings.standard_secret_list()] == [STD_1, STD_2]
    assert [s.get_secret_value() for s in settings.mercadopago_secret_list()] == [MP_1, MP_FILE_1, MP_FILE_2]
    assert settings.database_url == "postgresql://u:db-password-42@127.0.0.1/db"
    assert settings.max_body_bytes == 1000
    shown = repr(settings) + str(settings)
    assert MP_1 not in shown and STD_1[6:20] not in shown
    assert "db-password-42" not in shown


def test_a_missing_secret_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read WEBHOOK_MERCADOPAGO_SECRETS_FILE"):
        WebhookSettings(mercadopago_secrets_file=tmp_path / "absent")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("standard_secrets", "whsec_", "empty"),
        # Non-base64 characters used to be dropped silently: "change-me" became a 6-byte key.
        ("standard_secrets", "whsec_change-me", "not strict base64"),
        ("standard_secrets", "whsec_AA", "1 bytes, at least 24"),
        ("standard_secrets", "whsec_" + base64.b64encode(b"sixteen-byte-key").decode(), "16 bytes, at least 24"),
        # Long enough, but a placeholder in base64 clothing, or no key at all.
        ("standard_secrets", "whsec_" + base64.b64encode(b"please-change-me-before-going-live").decode(), "placeholder"),
        ("standard_secrets", "whsec_" + "A" * 44, "placeholder"),
        ("mercadopago_secrets", "change-me", "at least 24"),
        ("mercadopago_secrets", "your-secret-signature-goes-here", "placeholder"),
        ("mercadopago_secrets", "x" * 40, "placeholder"),
    ],
)
def test_weak_and_placeholder_secrets_are_refused_naming_the_variable_never_the_value(variable: str, value: str, message: str) -> None:
    good = {"standard_secrets": STD_1, "mercadopago_secrets": MP_1}
    # The bad one comes second, so the message must say which.
    values = {**good, variable: f"{good[variable]},{value}"}
    with pytest.raises(ValidationError) as info:
        WebhookSettings.model_validate(values)
    text = str(info.value)
    assert message in text
    assert f"WEBHOOK_{variable.upper()}: secret 2" in text
    shown = value.removeprefix("whsec_")
    assert not shown or shown not in text
    assert good[variable] not in text


def test_the_reference_suites_secret_and_a_generated_one_are_accepted() -> None:
    # 24 bytes: the shortest the specification allows (the reference package's own test secret).
    settings = WebhookSettings.model_validate({"standard_secrets": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "mercadopago_secrets": MP_1})
    assert len(settings.standard_secret_list()) == 1


def test_example_env_files_hold_no_secret_that_works() -> None:
    root = Path(__file__).resolve().parents[2]
    for example in [root / ".env.example", *sorted((root / "deploy" / "env").glob("*.example"))]:
        values = {}
        for line in example.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                values[name.strip()] = value.strip()
        for name in ("WEBHOOK_STANDARD_SECRETS", "WEBHOOK_MERCADOPAGO_SECRETS"):
            if values.get(name):
                with pytest.raises(ValidationError):
                    WebhookSettings.model_validate({name.removeprefix("WEBHOOK_").lower(): values[name]})
