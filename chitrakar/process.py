"""What a long-running Chitrakar process (a bot, a worker) does once it has started."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chitrakar.config import Settings


def configure_logging(settings: Settings) -> None:
    """Every process's log lines in one format, each naming its process."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO, which would log the bot token in each URL.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # torchao warns on import about GPU kernels a CPU build lacks; only its errors matter.
    logging.getLogger("torchao").setLevel(logging.ERROR)


def freeze_start_up_objects() -> None:
    """Take what start-up made (modules, the model, the Telegram application, the database
    engine: objects that live as long as the process) out of the garbage collector's sight.
    Python's full collections walk every tracked object, and every request in hand waits:
    in a worker with the tiny model, 534,207 objects and 0.29 s a collection. Frozen, they
    are skipped: the bot's ack p99 at 300 commands a second fell from 155 to 85 ms, and a
    worker's stop lost the 1.5 s its last collections took (BENCHMARKS.md). Start-up's
    garbage is collected first, as a frozen cycle is never freed; what is replaced later is
    freed by reference counting as before."""
    gc.collect()
    gc.freeze()


def die_with_parent(signum: int = signal.SIGTERM, parent: int | None = None) -> None:
    """In a child process: be sent `signum` when the parent dies (Linux; elsewhere nothing).
    `chitrakar run` starts its children with it, and a worker's embedded Celery beat (a fork
    of the worker, which a fork does not pass on to) asks for it too, so that neither lives
    on, holding the model's memory, after what started it was killed. `parent`: the pid the
    child was forked from; if that one died before the call, the signal is sent now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signum)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signum)
