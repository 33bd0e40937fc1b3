"""Settings read from the environment: an invalid one is reported as one line, by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from chitrakar.config import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("CHITRAKAR_DATA_DIR", str(tmp_path / "data"))


@pytest.mark.parametrize("secret", ["has space", "dots.are.out", "ümlaut", "a/b", "x=y"])
def test_a_webhook_secret_telegram_would_refuse_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    monkeypatch.setenv("CHITRAKAR_TELEGRAM_WEBHOOK_SECRET", secret)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert str(error.value).splitlines() == [
        "invalid settings:",
        "  CHITRAKAR_TELEGRAM_WEBHOOK_SECRET: use only the letters A-Z and a-z, digits, _ and -",
    ]
    assert secret not in str(error.value)  # a secret's value is never printed


@pytest.mark.parametrize("secret", ["A-z_09", "x", "s" * 256])
def test_a_webhook_secret_of_the_allowed_characters_is_taken(
    monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    monkeypatch.setenv("CHITRAKAR_TELEGRAM_WEBHOOK_SECRET", secret)
    settings = load_settings()
    assert settings.telegram_webhook_secret is not None
    assert settings.telegram_webhook_secret.get_secret_value() == secret
