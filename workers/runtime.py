"""What one worker process holds for its whole life: settings, store, the loaded model and
the channel it delivers to. Built once per process, after any fork."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from functools import cached_property

from chitrakar.artifacts import artifact_store_from_url
from chitrakar.config import Settings
from chitrakar.media import MediaStore
from chitrakar.styles import StyleCatalogue, load_catalogue
from db.session import Store
from db.web import CHANNEL as WEB_CHANNEL
from workers.classifier import OutputClassifier
from workers.delivery import CHANNEL as TELEGRAM_CHANNEL
from workers.delivery import TelegramDelivery
from workers.identity import IdentityStage, choose_identity_stage
from workers.outbound import ChannelDeliveries, Delivery
from workers.pipelines import LoadedPipeline, default_dtype, load_pipeline, resolve_device
from workers.web_delivery import WebDelivery

log = logging.getLogger(__name__)


class WorkerRuntime:
    def __init__(self, settings: Settings, publish: Callable[[int], None]) -> None:
        self.settings = settings
        # Hands a job to the broker (held jobs of a user, when one of theirs ends).
        self.publish = publish
        self.store = Store(settings.resolved_database_url)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.catalogue: StyleCatalogue = load_catalogue(settings.styles_file)
        self.media = MediaStore(settings.media_dir)
        self.artifacts = artifact_store_from_url(
            settings.artifact_store, settings.resolved_data_dir
        )

    @cached_property
    def delivery(self) -> ChannelDeliveries:
        """Each job's answer goes back to the channel it came from: the web chat (through
        the database), and Telegram when a token is set."""
        factories: dict[str, Callable[[], Delivery]] = {
            WEB_CHANNEL: lambda: WebDelivery(self.settings, self.store, self.catalogue)
        }
        if self.settings.telegram_token is not None:
            factories[TELEGRAM_CHANNEL] = lambda: TelegramDelivery(self.settings, self.catalogue)
        return ChannelDeliveries(factories)

    def model_source(self) -> str:
        if self.settings.model is not None:
            return self.settings.model
        folder = self.settings.demo_model_dir
        if not (folder / "model_index.json").exists():
            from workers.tiny import make_tiny

            log.warning("CHITRAKAR_MODEL is not set: making the tiny demo model in %s", folder)
            make_tiny(folder)
        log.warning(
            "using the tiny demo model: its images are noise. Set CHITRAKAR_MODEL to a "
            "diffusers folder or hub id for real images."
        )
        return str(folder)

    @cached_property
    def pipeline(self) -> LoadedPipeline:
        device = resolve_device(self.settings.device)
        return load_pipeline(self.model_source(), device, default_dtype(device))

    @cached_property
    def classifier(self) -> OutputClassifier:
        """The content check every image passes before it is sent (loaded once)."""
        return OutputClassifier()

    @cached_property
    def identity(self) -> IdentityStage:
        return choose_identity_stage(self.settings, self.pipeline)

    def close(self) -> None:
        if "delivery" in self.__dict__:
            self.delivery.close()
        self.store.dispose()
