"""What one worker process holds for its whole life: settings, store, the loaded model and
the channel it delivers to. Built once per process, after any fork."""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property

from PIL import Image
from sqlalchemy import text as sql

from chitrakar.artifacts import artifact_store_from_url
from chitrakar.config import Settings
from chitrakar.domain import GenerationPlan
from chitrakar.media import MediaStore
from chitrakar.planning import usual_sizes
from chitrakar.styles import StyleCatalogue, load_catalogue
from db import heartbeats
from db.session import Store
from db.web import CHANNEL as WEB_CHANNEL
from workers.acceleration import warm_up
from workers.classifier import OutputClassifier
from workers.delivery import CHANNEL as TELEGRAM_CHANNEL
from workers.delivery import TelegramDelivery
from workers.identity import IdentityStage, choose_identity_stage
from workers.outbound import ChannelDeliveries, Delivery
from workers.pipelines import (
    LoadedPipeline,
    load_configured,
    resolve_device,
    text_to_image,
    use_lora,
)
from workers.web_delivery import WebDelivery

log = logging.getLogger(__name__)


def worker_name() -> str:
    """This process's name among the workers, for its heartbeat and the jobs it runs:
    "hostname/run:pid", where run is random, so the name is unique per process start. A
    container restarted after a kill (a restart policy, the OOM killer) often has the same
    hostname and pid as the process it replaces: under the dead one's name it would beat for
    it, and the reconciler would never hand the dead one's running jobs back. (A hostname
    holds no "/" or ":"; the pid stays last, after the last ":".)"""
    return f"{socket.gethostname()}/{secrets.token_hex(4)}:{os.getpid()}"


@dataclass(frozen=True)
class ClaimsToHandBack:
    """The jobs this worker started from `since` to `until`, but not those `kept`: claimed
    for a batch whose claims' outcome was lost."""

    leader_id: int
    since: datetime
    until: datetime
    kept: tuple[int, ...]


class WorkerRuntime:
    def __init__(self, settings: Settings, publish: Callable[[int], None]) -> None:
        self.settings = settings
        # Hands a job to the broker (held jobs of a user, when one of theirs ends).
        self.publish = publish
        self.store = Store(settings.resolved_database_url)
        self.name = worker_name()
        self.catalogue: StyleCatalogue = load_catalogue(settings.styles_file)
        self.media = MediaStore(settings.media_dir)
        self.artifacts = artifact_store_from_url(
            settings.artifact_store, settings.resolved_data_dir
        )
        self._heartbeat: Heartbeat | None = None
        # Batches whose claims could not be handed back (workers.service): tried again at
        # the start of each task until they are.
        self.claims_to_hand_back: list[ClaimsToHandBack] = []
        # Ends of jobs (a failure, a delivered job's hand-back) that a database outage longer
        # than the record retries kept from being written (workers.service): each raises
        # while the database is still away. Left undone, the job would stay running on this
        # live worker, which nothing else ends. Tried again at the start of each task and
        # after each heartbeat until they are done.
        self.ends_to_record: list[Callable[[], None]] = []
        self._recording_ends = threading.Lock()

    def record_ends_left(self) -> None:
        """Try again each end in `ends_to_record`; those still failing stay. Does nothing
        while another thread is at it (the heartbeat's, or the task's)."""
        if not self.ends_to_record or not self._recording_ends.acquire(blocking=False):
            return
        try:
            for record in list(self.ends_to_record):
                try:
                    record()
                except Exception:
                    log.warning("an end left unrecorded still cannot be recorded", exc_info=True)
                    continue
                self.ends_to_record.remove(record)
        finally:
            self._recording_ends.release()

    def _record_ends_left_aside(self) -> None:
        # From the heartbeat's thread: an apology may wait on the chat (a flood limit), and
        # the heartbeat must not wait with it.
        if self.ends_to_record:
            threading.Thread(target=self.record_ends_left, name="ends", daemon=True).start()

    @cached_property
    def delivery(self) -> ChannelDeliveries:
        """Each job's answer goes back to the channel it came from: the web chat (through
        the database), and Telegram when a token is set."""
        factories: dict[str, Callable[[], Delivery]] = {
            WEB_CHANNEL: lambda: WebDelivery(self.settings, self.store, self.catalogue)
        }
        if self.settings.telegram_token is not None:
            factories[TELEGRAM_CHANNEL] = lambda: TelegramDelivery(
                self.settings, self.catalogue, self.store
            )
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
        """The model, loaded once, under its preset; a preset this device cannot run is
        refused here, at start-up, with the reason (PresetError)."""
        device = resolve_device(self.settings.device)
        return load_configured(self.settings, self.model_source(), device, self.style_loras())

    def style_loras(self) -> list[str]:
        """The catalogue's LoRA files: a compiled model makes room for them before compiling."""
        styles = self.catalogue.styles.values()
        return [str(style.lora) for style in styles if style.lora is not None]

    def warm_up(self) -> None:
        """Load the model and the avatars' identity stage and, for a compiled preset, compile
        them before the first user waits: a short generation, and a short avatar, at each
        size jobs take without an --ar of their own (a plain command's square and each
        style's; every new size compiles again), of one image and of two (from the second
        batch size on, torch.compile makes the batch dimension dynamic, so no later batch
        size, such as an avatar's four images, compiles again)."""
        loaded, size = self.pipeline, self.settings.image_size
        # An IP-Adapter replaces the UNet's attention processors: loaded before compiling,
        # or every graph compiled here would be compiled again inside the first job.
        identity = self.identity
        sizes = usual_sizes(self.catalogue, size)
        # With style LoRAs in a compiled UNet's slot, the UNet runs with the slot on and off:
        # both are compiled now (any LoRA of the slot will do; the weights are not guarded).
        slot = loaded.style_slot
        styles = [None, next(iter(slot.files))] if slot is not None else [None]

        def generate() -> None:
            for (width, height), style, count in itertools.product(sizes, styles, (1, 2)):
                use_lora(loaded, style, 1.0)
                plan = GenerationPlan(
                    prompt="warm-up",
                    width=width,
                    height=height,
                    steps=2,
                    seeds=tuple(range(count)),
                    guidance_scale=self.settings.guidance_scale,
                )
                text_to_image(loaded, plan, **identity.without_face(loaded))
                # An avatar: img2img runs text2image's graphs (`start_pixels`), but with an
                # IP-Adapter its face branch runs others.
                face = Image.new("RGB", (width, height))
                identity.avatars(loaded, replace(plan, strength=0.5), face, None)
            use_lora(loaded, None, 1.0)

        assert loaded.preset is not None
        warm_up(generate, loaded.preset)
        # The content check's model too: it would otherwise load inside the first job (and,
        # with a batch's jobs finished side by side, perhaps in several threads at once).
        self.classifier.classify(Image.new("RGB", (size, size)))

    @cached_property
    def finishing(self) -> FinishingLane:
        """Where each batch's images are checked, stored and sent after its pipeline call:
        behind the next pipeline call where the model runs on a GPU (or when set "on")."""
        choice = self.settings.finish_while_generating
        on_gpu = resolve_device(self.settings.device).type != "cpu"
        return FinishingLane(behind=choice == "on" or (choice == "auto" and on_gpu))

    @cached_property
    def classifier(self) -> OutputClassifier:
        """The content check every image passes before it is sent (loaded once)."""
        return OutputClassifier()

    @cached_property
    def identity(self) -> IdentityStage:
        return choose_identity_stage(self.settings, self.pipeline)

    def start_heartbeat(self) -> None:
        """Write this worker's heartbeat every CHITRAKAR_HEARTBEAT_INTERVAL seconds, and run
        the reconciler every CHITRAKAR_RECONCILE_INTERVAL, from a thread of its own: a long
        generation silences neither, and the reconciler never waits in the queue behind the
        very jobs it is to rescue. Every live worker reconciles; doing it twice is harmless."""
        if self._heartbeat is None:
            from chitrakar.services import reconcile

            self._heartbeat = Heartbeat(
                self.store,
                self.name,
                self.settings.heartbeat_interval,
                lambda: reconcile(self.store, self.publish, self.settings),
                self.settings.reconcile_interval,
                self._record_ends_left_aside,
                quiet_after_outage=self.settings.worker_stale_after,
            )
            log.info("worker %s beating", self.name)
            self._heartbeat.start()

    @property
    def beating(self) -> bool:
        return self._heartbeat is not None and self._heartbeat.running

    def check_ready(self, broker_ping: Callable[[], None]) -> None:
        """Raises unless the database and the broker answer and the model is loaded."""
        if "pipeline" not in self.__dict__:
            raise RuntimeError("the model is not loaded yet")
        with self.store.engine.connect() as connection:
            connection.execute(sql("select 1"))
        broker_ping()

    def close(self) -> None:
        # The batch still being finished first: its jobs are this worker's until then.
        if "finishing" in self.__dict__:
            self.finishing.close()
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if "delivery" in self.__dict__:
            self.delivery.close()
        self.store.dispose()


class FinishingLane:
    """Runs what follows a pipeline call: each job of the batch checked, stored, sent and
    recorded, and its user's held jobs handed over. Inline, the task does it before it
    returns. Behind, a thread of the lane's own does it while the task returns and the
    worker's next pipeline call runs: on a GPU that work (the content check, the PNG, the
    upload: 50 ms for one 1024×1024 image on 2 cores) would otherwise leave the GPU idle.
    One batch at a time: the next is handed in once the one before is finished, so a worker
    holds at most two batches' images. Called from the worker's one task thread."""

    def __init__(self, behind: bool) -> None:
        self._thread = ThreadPoolExecutor(1, "finishing") if behind else None
        self._last: Future[None] | None = None
        self._last_jobs: frozenset[int] = frozenset()

    @property
    def behind(self) -> bool:
        return self._thread is not None

    def run(self, finish: Callable[[], None], job_ids: Iterable[int]) -> None:
        if self._thread is None:
            finish()
            return
        self.wait()
        self._last_jobs = frozenset(job_ids)
        self._last = self._thread.submit(_logged, finish)

    def holds(self, job_id: int) -> bool:
        """Whether the job is still being finished here. Its batch mates' own messages come
        while it is: the job is this worker's, running, and must not be started again."""
        last = self._last
        return last is not None and not last.done() and job_id in self._last_jobs

    def wait(self) -> None:
        """Until the batch handed in last is finished."""
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def close(self) -> None:
        self.wait()
        if self._thread is not None:
            self._thread.shutdown()


def _logged(finish: Callable[[], None]) -> None:
    # Each job's own failures are recorded inside `finish`; what escapes it (a hand-over
    # with the database away) is logged, as Celery logs what escapes a task run inline.
    try:
        finish()
    except BaseException:  # the lane's thread goes on with the next batch
        log.exception("finishing a batch failed")


class Heartbeat:
    def __init__(
        self,
        store: Store,
        name: str,
        interval: float,
        reconcile: Callable[[], object],
        reconcile_every: float,
        after_beat: Callable[[], object] = lambda: None,
        quiet_after_outage: float = 0.0,
    ) -> None:
        """`quiet_after_outage`: how long beats must go through again, after one failed,
        before this worker reconciles (the time a worker may stay silent before it is taken
        for dead)."""
        self._store, self._name, self._interval = store, name, interval
        self._reconcile, self._reconcile_every = reconcile, reconcile_every
        self._after_beat = after_beat
        self._quiet_after_outage = quiet_after_outage
        # Since when beats have gone through without a break; None while they fail.
        self._beating_since: float | None = time.monotonic() - quiet_after_outage
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()  # at once: the worker is alive before it takes its first job
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _beat(self) -> None:
        try:
            with self._store.unit_of_work() as uow:
                heartbeats.beat(uow, self._name)
        except Exception:
            # The database away for a moment: the next beat tries again.
            log.warning("could not write the heartbeat of %s", self._name, exc_info=True)
            self._beating_since = None
            return
        if self._beating_since is None:
            self._beating_since = time.monotonic()
        try:
            self._after_beat()
        except Exception:
            log.warning("what follows the heartbeat of %s failed", self._name, exc_info=True)

    def _run(self) -> None:
        next_reconcile = time.monotonic() + self._reconcile_every
        while not self._stopping.wait(min(self._interval, self._reconcile_every)):
            self._beat()
            if time.monotonic() >= next_reconcile and self._others_could_beat():
                next_reconcile = time.monotonic() + self._reconcile_every
                try:
                    self._reconcile()
                except Exception:
                    log.warning("the reconciler's round failed; next round soon", exc_info=True)

    def _others_could_beat(self) -> bool:
        """Whether the other workers have had the time to beat since the database was last
        away: when it comes back, every live worker's last beat is old, and a reconciler
        going at once would take them all for dead and hand their jobs to the queue."""
        since = self._beating_since
        return since is not None and time.monotonic() - since >= self._quiet_after_outage

    def stop(self) -> None:
        """A clean stop: this worker holds no job any more."""
        self._stopping.set()
        self._thread.join(timeout=10)
        try:
            with self._store.unit_of_work() as uow:
                heartbeats.forget(uow, self._name)
        except Exception:
            log.warning("could not remove the heartbeat of %s", self._name, exc_info=True)
