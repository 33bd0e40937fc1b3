"""The one place that wires the bot process's parts: settings, store, queue and the services
every chat channel calls (Telegram's handlers and the web chat alike)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery import Celery

from chitrakar.artifacts import artifact_store_from_url
from chitrakar.config import Settings
from chitrakar.media import MediaStore
from chitrakar.moderation import Moderation
from chitrakar.privacy import PrivacyService
from chitrakar.queue import make_celery, prepare_to_publish, publish_generate, publish_generate_many
from chitrakar.services import JobIntake
from chitrakar.styles import load_catalogue
from db.session import Store

if TYPE_CHECKING:
    from bot.intake_process import IntakeProcess

log = logging.getLogger(__name__)

# The channel Telegram's users and jobs are recorded under.
CHANNEL = "telegram"
# How long a readiness check waits for the database or the broker.
READINESS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BotServices:
    settings: Settings
    intake: JobIntake
    privacy: PrivacyService
    moderation: Moderation
    store: Store
    celery: Celery
    # Where the commands' intake runs (bot/intake_process.py); None: the bot's threads.
    intake_process: IntakeProcess | None = None

    def broker_ping(self) -> None:
        """Blocks; raises when the broker cannot be reached."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=READINESS_TIMEOUT_S)

    def warm_up(self) -> None:
        """Blocks. What the first command would otherwise wait for: the broker's client
        imported and connected, the database connected. A broker or database that cannot
        be reached is logged, not raised: the bot serves what it can, and /readyz tells."""
        try:
            prepare_to_publish(self.celery, READINESS_TIMEOUT_S)
        except Exception as exc:
            log.warning("the broker cannot be reached yet: %s", exc)
        try:
            with self.store.engine.connect():
                pass
        except Exception as exc:
            log.warning("the database cannot be reached yet: %s", exc)

    def close(self) -> None:
        if self.intake_process is not None:
            self.intake_process.shutdown()
        self.store.dispose()


def bootstrap(settings: Settings) -> BotServices:
    store = Store(settings.resolved_database_url)
    celery = make_celery(settings, name="chitrakar.bot")
    media = MediaStore(settings.media_dir)
    artifacts = artifact_store_from_url(settings.artifact_store, settings.resolved_data_dir)
    intake = JobIntake(
        settings,
        store,
        lambda job_id: publish_generate(celery, job_id),
        load_catalogue(settings.styles_file),
        media,
        artifacts,
        publish_many=lambda job_ids: publish_generate_many(celery, job_ids),
    )
    intake_process = None
    if settings.bot_intake_process:
        from bot.intake_process import IntakeProcess

        intake_process = IntakeProcess(settings)
    return BotServices(
        settings=settings,
        intake=intake,
        privacy=PrivacyService(store, artifacts, media, settings.zone),
        moderation=Moderation(settings, store, artifacts),
        store=store,
        celery=celery,
        intake_process=intake_process,
    )
