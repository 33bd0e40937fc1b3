"""The embedded broker: kombu's filesystem transport, with each message written whole before
a worker can see it.

kombu's own transport creates a message's file in the queue folder, then encodes and writes
the message into it, and its reader takes files without waiting for the writer's lock. A
worker that looks in between reads an empty or partial message, and Celery stops on it as an
unrecoverable error (kombu issue #1551): under load this happened one test run in a few. Here
a message is written in a staging folder beside the queue folder and then renamed into it,
which is atomic on one filesystem. A file in the queue folder that still is not a message
(one cut short by a crash, say) is logged and skipped rather than fatal: the job it carried
is in the database, which republishes a job whose message was lost.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from functools import cached_property
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

# How the Celery configuration names this transport (kombu imports it by this path).
TRANSPORT = f"{__name__}:Transport"
# Numbers the messages this process writes.
_sequence = itertools.count()


class Channel(filesystem.Channel):  # type: ignore[misc]
    @cached_property
    def staging_folder(self) -> Path:
        """Where messages are written before they appear: beside the queue folder, so on its
        filesystem (made by the first message)."""
        return Path(self.data_folder_out).parent / "staging"

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        # kombu's name (the reader sorts it as text and matches the queue by its suffix);
        # unique. The milliseconds have a fixed width, or 9999 would sort after 10000 (kombu
        # writes them bare; a machine up for a few minutes crosses such a boundary). The
        # sequence keeps the order of one process's messages within a millisecond (a batch
        # of jobs is published in one).
        milliseconds = round(monotonic() * 1000)
        name = f"{milliseconds:015d}_{next(_sequence):012d}_{uuid.uuid4()}.{queue}.msg"
        staged = self.staging_folder / name
        data = str_to_bytes(dumps(payload))
        try:
            try:
                staged.write_bytes(data)
            except FileNotFoundError:  # the first message, or the folder was removed
                self.staging_folder.mkdir(parents=True, exist_ok=True)
                staged.write_bytes(data)
            os.replace(staged, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise filesystem.ChannelError(f"cannot add a message to {queue}: {exc}") from exc

    def _get(self, queue: str) -> Any:
        try:
            payload = super()._get(queue)
        except ValueError as exc:  # JSONDecodeError: kombu has removed the file already
            log.error("skipped an unreadable message in queue %s: %s", queue, exc)
            raise Empty() from None
        if not (isinstance(payload, dict) and "properties" in payload and "body" in payload):
            log.error("skipped a file in queue %s that is not a message", queue)
            raise Empty()
        return payload


# The transport option that caps one wait for a message, in seconds: the worker's app sets it
# (`celery_config(..., worker=True)`). Celery's worker loop, the synchronous one this transport
# gets, waits 2 s a turn and looks for a stop request only between turns; a capped wait ends
# with kombu's timeout, which that loop takes as "nothing came" and waits again.
WAIT_CAP_OPTION = "worker_wait_cap_s"


class Transport(filesystem.Transport):  # type: ignore[misc]
    Channel = Channel

    def drain_events(self, connection: Any, timeout: float | None = None) -> Any:
        # Only where the option is set: any other caller that gives a timeout (a SimpleQueue's
        # get, say) waits as long as it asked. No timeout still means wait for a message.
        cap = self.client.transport_options.get(WAIT_CAP_OPTION)
        if cap is not None and timeout is not None:
            timeout = min(timeout, cap)
        return super().drain_events(connection, timeout=timeout)
