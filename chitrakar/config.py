"""Settings, read once per process from the environment (prefix ``CHITRAKAR_``) and ``.env``."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chitrakar.domain import SIZE_MULTIPLE

ENV_PREFIX = "CHITRAKAR_"
TELEGRAM_API_URL = "https://api.telegram.org/bot"
TELEGRAM_FILE_URL = "https://api.telegram.org/file/bot"
# The characters Telegram allows in a webhook's secret token (its length is checked apart).
WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]+")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# What chitrakar.artifacts.artifact_store_from_url reads (it checks the rest of the URL).
ARTIFACT_STORE_SCHEMES = ("file", "s3")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        # `CHITRAKAR_TELEGRAM_TOKEN=` (as an env file or a compose file leaves a setting
        # blank) means unset, not an empty token, model name or path ("." for a path).
        env_ignore_empty=True,
    )

    telegram_token: SecretStr | None = None
    # python-telegram-bot's base_url form: the token is appended to it.
    telegram_api_url: str = TELEGRAM_API_URL
    telegram_file_url: str = TELEGRAM_FILE_URL
    # Webhook mode: Telegram posts updates to this public HTTPS URL (polling when unset).
    # The server listens on web_host:web_port at the URL's path, behind your TLS proxy.
    telegram_webhook_url: str | None = None
    # Required with a webhook: Telegram sends it in X-Telegram-Bot-Api-Secret-Token.
    telegram_webhook_secret: SecretStr | None = Field(default=None, min_length=1, max_length=256)
    # Polling: seconds the bot waits after each getUpdates answer before asking again, so that
    # updates arriving together come in one answer (under load, one call per update cost the
    # bot a fifth of its CPU). An update that finds the bot waiting is answered at once.
    telegram_poll_interval: float = Field(default=0.05, ge=0.0, le=5.0)
    # The one HTTP server of the bot process: the web chat, the webhook and health checks.
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8080, ge=1, le=65535)
    # Bot processes sharing web_port (SO_REUSEPORT, Linux): the kernel spreads the webhook's
    # and the web chat's connections over them, so the bot uses more than one core. With
    # Telegram, more than one needs the webhook (getUpdates has a single reader).
    bot_processes: int = Field(default=1, ge=1, le=64)
    # Run the commands' intake (database and broker work) in a child process of each bot
    # process: under load one process is bound to one core, half of it this work
    # (bot/intake_process.py). Worth it on 2 or more cores, for a busy bot.
    bot_intake_process: bool = False
    # Set by the first bot process for the others it starts (1, 2, ...); not for operators.
    bot_process_index: int = Field(default=0, ge=0)
    # The built-in web chat (the channel that needs no Telegram), on by default.
    web_chat: bool = True
    # Where browsers reach the web chat, for sign-in links (behind a proxy: its public
    # https URL; https also marks the session cookie Secure). Unset: http://web_host:web_port.
    web_url: str | None = None
    # Days a web chat sign-in lasts, and hours a sign-in link stays valid (once).
    web_session_days: float = Field(default=30, gt=0)
    web_link_hours: float = Field(default=24, gt=0)
    # Seconds between two progress edits of one status message (Telegram allows about one
    # edit a second per chat, and far fewer in busy groups).
    progress_interval: float = Field(default=3.0, ge=0.0)

    data_dir: Path = Path("data")
    # Where results are kept: unset, the data dir; "file:///abs/path"; or an S3-compatible
    # store, "s3://bucket/prefix?endpoint_url=http://minio:9000&region=…" (credentials from
    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS config files).
    artifact_store: str | None = None
    database_url: str | None = None
    broker_url: str | None = None

    # A local diffusers folder or a hub id. Unset: the tiny demo model in the data dir,
    # made on first use (its images are noise; it exists so that everything runs anywhere).
    model: str | None = None
    # "auto", "cpu", "mps", "cuda" or "cuda:N". One worker process per GPU: start one per
    # card, each with its own CHITRAKAR_DEVICE=cuda:N (or CUDA_VISIBLE_DEVICES).
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    # How the model is loaded and run (precision, compile, quantisation, offload, few-step):
    # a name from `chitrakar presets`. Unset: the model's own preset, else the device's default.
    preset: str | None = None
    # A TOML file of presets that replace or add to the built-in ones (chitrakar/presets.toml).
    presets_file: Path | None = None
    # Dynamic batching: portrait jobs that could share one pipeline call (same size, steps,
    # guidance, image count and style LoRA) are generated together, up to this many images
    # per call (1: no batching). When other jobs are waiting, the worker waits up to
    # batch_window_ms for companions; a lone user's job never waits.
    max_batch_images: int = Field(default=8, ge=1, le=64)
    batch_window_ms: float = Field(default=20.0, ge=0.0, le=1000.0)
    # Whether a batch's images are checked, stored and sent while the worker's next pipeline
    # call runs. "auto": where the model runs on a GPU (on a CPU both would want the same
    # cores).
    finish_while_generating: Literal["auto", "on", "off"] = "auto"
    # Side of a square image in pixels; other aspect ratios keep about the same area. A
    # multiple of the VAE's factor: upscale tiles are this size, and a pipeline rounds down.
    image_size: int = Field(default=512, ge=64, le=2048, multiple_of=SIZE_MULTIPLE)
    default_steps: int = Field(default=25, ge=1, le=50)
    guidance_scale: float = Field(default=7.0, ge=0.0, le=30.0)

    # Telegram user ids of the bot's admins, comma-separated ("12345,67890").
    admin_ids: str = ""
    # What happens to an image the content check flags: block it (refunded), send it under
    # a spoiler, or allow it (private, adult-only deployments). Groups may choose their own.
    content_policy: Literal["block", "spoiler", "allow"] = "block"
    # A TOML file of terms that add to (or, under [allow], remove from) the prompt block lists.
    blocklist_file: Path | None = None

    # Credits a user may spend per day (a default image costs 1), and the zone whose midnight
    # starts a new day.
    daily_quota: int = Field(default=20, ge=0)
    timezone: str = "UTC"
    # Jobs of one user handed to the workers at a time; the rest wait their turn in the
    # database, so one user's flood cannot hold up everyone else.
    max_jobs_in_flight: int = Field(default=2, ge=1)
    # Results are deleted this many days after their job ended; selfie crops this many hours
    # after the last job that used them (0: as soon as it ends; then 🔄 Again on an avatar
    # asks for the selfie again).
    retention_days: float = Field(default=30, gt=0)
    input_retention_hours: float = Field(default=0, ge=0)

    # A TOML file of styles that replace, add to or hide the built-in catalogue's entries.
    styles_file: Path | None = None
    # Identity for avatars: an IP-Adapter folder in h94/IP-Adapter's layout (models/ with the
    # weights and models/image_encoder/). Unset or missing: img2img from the aligned face.
    identity_adapter: Path | None = None
    identity_adapter_weights: str = "ip-adapter-plus-face_sd15.safetensors"
    identity_adapter_scale: float = Field(default=0.6, ge=0.0, le=1.0)

    # Reliability. Workers write a heartbeat this often; one silent for `worker_stale_after`
    # is taken for dead and its running job goes back to the queue. The reconciler (run by
    # every worker this often) also publishes again a queued job whose message has waited
    # longer than `republish_after` (a broker that restarted without persistence lost it).
    heartbeat_interval: float = Field(default=10.0, gt=0)
    worker_stale_after: float = Field(default=60.0, gt=0)
    reconcile_interval: float = Field(default=60.0, gt=0)
    republish_after: float = Field(default=600.0, gt=0)
    # A worker's /healthz and /readyz, on web_host at this port (unset: none).
    worker_health_port: int | None = Field(default=None, ge=1, le=65535)

    log_level: str = "INFO"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as Asia/Kolkata)"
            ) from None
        return value

    @field_validator("telegram_webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # Telegram's setWebhook refuses any other character; say so before start-up.
        if value is not None and not WEBHOOK_SECRET.fullmatch(value.get_secret_value()):
            raise ValueError("use only the letters A-Z and a-z, digits, _ and -")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.strip().upper() not in LOG_LEVELS:
            raise ValueError(f"use one of {', '.join(LOG_LEVELS)} (in any case), not {value!r}")
        return value.strip().upper()

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except (ArgumentError, ValueError):
            # The value is left out: it may hold a password.
            raise ValueError(
                "not a database URL; use postgresql+psycopg://USER:PASSWORD@HOST:5432/NAME, or "
                "leave it unset for SQLite in the data dir"
            ) from None
        return value

    @field_validator("artifact_store")
    @classmethod
    def _artifact_store(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return value
        scheme = urlsplit(value.strip()).scheme.lower()
        if scheme not in ARTIFACT_STORE_SCHEMES:
            raise ValueError(
                f"unknown scheme {scheme!r}; use file:///absolute/path or "
                "s3://bucket/prefix?endpoint_url=...&region=... (or leave it unset for the "
                "data dir)"
            )
        return value

    @model_validator(mode="after")
    def _stale_after_heartbeats(self) -> Self:
        # A worker silent for worker_stale_after is taken for dead and its job given to
        # another: one late heartbeat must not be enough.
        if self.worker_stale_after <= 2 * self.heartbeat_interval:
            raise ValueError(
                f"{ENV_PREFIX}WORKER_STALE_AFTER ({self.worker_stale_after:g} s) must be more "
                f"than twice {ENV_PREFIX}HEARTBEAT_INTERVAL ({self.heartbeat_interval:g} s), "
                "or a live worker's job is taken from it after one late heartbeat"
            )
        return self

    @field_validator("admin_ids")
    @classmethod
    def _ids(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip() and not part.strip().isdigit():
                raise ValueError(f"CHITRAKAR_ADMIN_IDS: {part.strip()!r} is not a Telegram user id")
        return value

    @property
    def bot_admins(self) -> frozenset[str]:
        return frozenset(part.strip() for part in self.admin_ids.split(",") if part.strip())

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @cached_property
    def resolved_data_dir(self) -> Path:
        path = self.data_dir.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'chitrakar.db'}"

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded broker (kombu's filesystem transport)."""
        return self.resolved_data_dir / "broker"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def media_dir(self) -> Path:
        """Aligned selfies and style previews. Bot and workers must see the same folder (on
        several hosts: a shared volume), as they do the database."""
        return self.resolved_data_dir / "media"

    @property
    def compile_cache_dir(self) -> Path:
        """torch.compile's on-disk cache: a restarted worker reuses its compiled kernels."""
        return self.resolved_data_dir / "compile-cache"

    @property
    def model_label(self) -> str:
        """What names the model in caches of its images (style previews)."""
        return f"{self.model or 'tiny-demo'}@{self.image_size}"

    @property
    def demo_model_dir(self) -> Path:
        return self.resolved_data_dir / "models" / "tiny-demo"

    @property
    def uses_demo_model(self) -> bool:
        return self.model is None

    @property
    def public_web_url(self) -> str:
        """The web chat's address as users reach it, without a trailing slash."""
        if self.web_url:
            return self.web_url.rstrip("/")
        host = f"[{self.web_host}]" if ":" in self.web_host else self.web_host
        return f"http://{host}:{self.web_port}"


class SettingsError(ValueError):
    """A setting in the environment or .env is invalid; the message names each one."""


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        # One line a setting, named as the operator wrote it. The value is left out: it may
        # be a token or a password.
        problems = []
        for error in exc.errors(include_url=False):
            name = ENV_PREFIX + "_".join(str(part) for part in error["loc"]).upper()
            message = error["msg"].removeprefix("Value error, ")
            problems.append(message if message.startswith(name) else f"{name}: {message}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None
