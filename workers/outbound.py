"""The outbound interface: what a worker says in a chat about a job, whichever channel the job
came from. Each channel (Telegram, the web chat) implements `Delivery`; the worker talks to
`ChannelDeliveries`, which hands each call to the job's channel."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from chitrakar.domain import JobKind
from chitrakar.styles import StyleCatalogue
from chitrakar.texts import text
from db.jobs import JobView

log = logging.getLogger(__name__)


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Delivered:
    """What the channel knows the sent images by (Telegram's file ids; the web chat's image
    references), and the messages that carry them."""

    file_ids: list[str]
    message_ids: list[int]
    # The chat they went to, when not the job's (a group that became a supergroup).
    chat_id: int | None = None
    # What follows the sent images (an album's buttons, removing the status message), for
    # the caller to run once the delivery is recorded: a worker that dies before it records
    # the delivery sends the images again. Never raises.
    follow_up: Callable[[], None] = _nothing


class Delivery(Protocol):
    def started(self, job: JobView) -> None: ...

    def progress(self, job: JobView, done: int, total: int) -> None:
        """Show progress; may be dropped (throttled), never queued."""

    def stop_progress(self, job: JobView) -> None:
        """The job stopped without a result to send (cancelled)."""

    def uploading(self, job: JobView) -> None:
        """Show that the result is on its way, without waiting: called as the job's images
        are checked and stored. `deliver` sends nothing before this has landed."""

    def deliver(
        self, job: JobView, images: Sequence[Image.Image], seconds: float, spoiler: bool = False
    ) -> Delivered:
        """Send the result (its images, already stored); raises when it could not be sent.
        The caller records the delivery, then runs the returned `follow_up`."""
        ...

    def deliver_previews(self, job: JobView, grid: Path) -> list[str]: ...

    def blocked(self, job: JobView) -> None:
        """The content check held the images back (credits refunded)."""

    def apologise(self, job: JobView) -> None:
        """The job failed (credits refunded)."""

    def close(self) -> None: ...


class UnknownChannel(RuntimeError):
    pass


class ChannelDeliveries:
    """Every channel's delivery, each made on first use (Telegram's opens a connection)."""

    def __init__(self, factories: dict[str, Callable[[], Delivery]]) -> None:
        self._factories = factories
        self._made: dict[str, Delivery] = {}

    def channel(self, name: str) -> Delivery:
        if name not in self._made:
            factory = self._factories.get(name)
            if factory is None:
                raise UnknownChannel(f"this worker cannot deliver to channel {name!r}")
            self._made[name] = factory()
        return self._made[name]

    def connect_all(self) -> None:
        """Open every channel now, so that no user waits for it (at the worker's start)."""
        for name in self._factories:
            self.channel(name)

    def started(self, job: JobView) -> None:
        self.channel(job.channel).started(job)

    def progress(self, job: JobView, done: int, total: int) -> None:
        self.channel(job.channel).progress(job, done, total)

    def stop_progress(self, job: JobView) -> None:
        self.channel(job.channel).stop_progress(job)

    def uploading(self, job: JobView) -> None:
        self.channel(job.channel).uploading(job)

    def deliver(
        self, job: JobView, images: Sequence[Image.Image], seconds: float, spoiler: bool = False
    ) -> Delivered:
        return self.channel(job.channel).deliver(job, images, seconds, spoiler)

    def deliver_previews(self, job: JobView, grid: Path) -> list[str]:
        return self.channel(job.channel).deliver_previews(job, grid)

    def blocked(self, job: JobView) -> None:
        self.channel(job.channel).blocked(job)

    def apologise(self, job: JobView) -> None:
        try:
            self.channel(job.channel).apologise(job)
        except UnknownChannel:
            log.error("job %s failed and its channel %r cannot be told", job.id, job.channel)

    def close(self) -> None:
        # Each closed once, however often this is called.
        made, self._made = self._made, {}
        for delivery in made.values():
            try:
                delivery.close()
            except Exception:
                log.exception("closing a delivery failed")


def result_caption(catalogue: StyleCatalogue, job: JobView, seed: int, seconds: float) -> str:
    """What was used, so that the user can make the image again."""
    plan = job.plan
    size = {"seed": seed, "width": plan.width, "height": plan.height, "seconds": seconds}
    if job.kind == JobKind.UPSCALE:
        return text(job.language, "result.caption_upscaled", **size)
    style = catalogue.get(plan.style) if plan.style else None
    if style is None:
        caption = text(job.language, "result.caption", steps=plan.steps, **size)
    else:
        caption = text(
            job.language,
            "result.caption_style",
            style=style.name_in(job.language),
            code=style.key,
            steps=plan.steps,
            **size,
        )
    negative = job.options.get("negative")
    if negative:
        caption += "\n" + text(job.language, "result.without", negative=negative)
    return caption
