"""Settings read from the environment: an invalid one is reported as one line, by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chitrakar.config import SettingsError, load_settings
from tests.support.stack import run_chitrakar


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


EMPTY_MEANS_UNSET = [
    "CHITRAKAR_TELEGRAM_TOKEN",
    "CHITRAKAR_MODEL",
    "CHITRAKAR_BLOCKLIST_FILE",
    "CHITRAKAR_DATABASE_URL",
    "CHITRAKAR_WORKER_HEALTH_PORT",
]


@pytest.mark.parametrize("where", ["environment", ".env"])
def test_a_setting_left_empty_is_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str
) -> None:
    for name in EMPTY_MEANS_UNSET:
        if where == "environment":
            monkeypatch.setenv(name, "")
        else:
            monkeypatch.delenv(name, raising=False)
    if where == ".env":
        (tmp_path / ".env").write_text("".join(f"{name}=\n" for name in EMPTY_MEANS_UNSET))
    settings = load_settings()
    assert settings.telegram_token is None  # the web chat alone
    assert settings.model is None  # the tiny demo model
    assert settings.blocklist_file is None  # not "."
    assert settings.database_url is None  # SQLite in the data dir
    assert settings.worker_health_port is None


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file's sections, each key with its values in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = sections.setdefault(line[1:-1], {})
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            section.setdefault(key, []).append(value)
    return sections


def test_the_deployment_example_is_valid_and_leaves_telegram_optional(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    example = (DEPLOY / "chitrakar.env.example").read_text()
    (tmp_path / ".env").write_text(example)
    monkeypatch.delenv("CHITRAKAR_TELEGRAM_TOKEN", raising=False)
    # No placeholder token that Telegram would refuse at start: the web chat alone.
    assert load_settings().telegram_token is None


@pytest.mark.parametrize("unit", sorted(path.name for path in (DEPLOY / "systemd").iterdir()))
def test_each_systemd_unit_keeps_restarting_in_the_data_dir(unit: str) -> None:
    sections = _unit(DEPLOY / "systemd" / unit)
    # A database or broker that comes up late: restarted every 5 s, never given up on.
    assert sections["Unit"]["StartLimitIntervalSec"] == ["0"]
    service = sections["Service"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartSec"] == ["5s"]
    # The example's data dir, made by systemd for the service's user, is where it runs.
    example = (DEPLOY / "chitrakar.env.example").read_text()
    assert "\nCHITRAKAR_DATA_DIR=/var/lib/chitrakar\n" in example
    assert service["StateDirectory"] == ["chitrakar"]
    assert service["WorkingDirectory"] == ["/var/lib/chitrakar"]
    if unit.startswith("chitrakar-worker@"):
        # One health port per GPU instance: they would clash on one host otherwise.
        assert "CHITRAKAR_WORKER_HEALTH_PORT=918%i" in service["Environment"]


BAD_SETTINGS = [
    (
        {"CHITRAKAR_LOG_LEVEL": "verbose"},
        "CHITRAKAR_LOG_LEVEL: use one of DEBUG, INFO, WARNING, ERROR, CRITICAL (in any case), "
        "not 'verbose'",
    ),
    (
        {"CHITRAKAR_DATABASE_URL": "foo"},
        "CHITRAKAR_DATABASE_URL: not a database URL; use "
        "postgresql+psycopg://USER:PASSWORD@HOST:5432/NAME, or leave it unset for SQLite in the "
        "data dir",
    ),
    (
        {"CHITRAKAR_ARTIFACT_STORE": "ftp://x"},
        "CHITRAKAR_ARTIFACT_STORE: unknown scheme 'ftp'; use file:///absolute/path or "
        "s3://bucket/prefix?endpoint_url=...&region=... (or leave it unset for the data dir)",
    ),
    (
        {"CHITRAKAR_HEARTBEAT_INTERVAL": "10", "CHITRAKAR_WORKER_STALE_AFTER": "20"},
        "CHITRAKAR_WORKER_STALE_AFTER (20 s) must be more than twice "
        "CHITRAKAR_HEARTBEAT_INTERVAL (10 s), or a live worker's job is taken from it after one "
        "late heartbeat",
    ),
]


@pytest.mark.parametrize(("variables", "line"), BAD_SETTINGS)
def test_a_bad_setting_is_one_clear_line_not_a_traceback(
    tmp_path: Path, variables: dict[str, str], line: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHITRAKAR_")}
    env.update(CHITRAKAR_DATA_DIR=str(tmp_path / "data"), **variables)
    result = run_chitrakar("styles", "check", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["chitrakar: invalid settings:", f"  {line}"]


@pytest.mark.parametrize(
    "variables",
    [
        {"CHITRAKAR_LOG_LEVEL": "debug"},
        {"CHITRAKAR_LOG_LEVEL": "Warning"},
        {"CHITRAKAR_DATABASE_URL": "postgresql+psycopg://chitrakar:s3cr%40t@db:5432/chitrakar"},
        {"CHITRAKAR_DATABASE_URL": "sqlite:////var/lib/chitrakar/chitrakar.db"},
        {"CHITRAKAR_ARTIFACT_STORE": "file:///srv/artifacts"},
        {"CHITRAKAR_ARTIFACT_STORE": "S3://bucket/prefix?endpoint_url=http://minio:9000"},
        {"CHITRAKAR_HEARTBEAT_INTERVAL": "0.5", "CHITRAKAR_WORKER_STALE_AFTER": "3"},
    ],
)
def test_good_settings_are_taken(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.log_level in ("DEBUG", "INFO", "WARNING")
