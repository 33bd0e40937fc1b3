"""The worker's Celery app: the shared queue configuration plus this package's tasks."""

from __future__ import annotations

from typing import Any

from billiard.process import current_process  # type: ignore[import-untyped]
from celery.signals import beat_embedded_init
from celery.utils.timer2 import Timer

from chitrakar.config import load_settings
from chitrakar.process import die_with_parent
from chitrakar.queue import make_celery

# How long a stopping worker may wait for its timer thread.
TIMER_WAKE_S = 0.1


class PromptTimer(Timer):  # type: ignore[misc]
    """Celery's timer thread (the worker's, with the embedded broker), woken every
    TIMER_WAKE_S. With no entry due it waits up to 1 s before it looks at its stop flag, and
    a stopping worker waits for it: a second of every stop. A wake-up costs microseconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Celery's tick callback logs every wake-up at DEBUG: ten lines a second here.
        kwargs["on_tick"] = None
        super().__init__(*args, **kwargs)
        self.call_repeatedly(TIMER_WAKE_S, _nothing)


def _nothing() -> None:
    pass


def _beat_dies_with_its_worker(**_: Any) -> None:
    """In the beat a worker started with --beat forks off (`chitrakar run`'s): go when the
    worker goes. A fork keeps no die-with-parent setting, so a SIGKILLed worker (the kernel's
    OOM killer, a crash) left its beat running, holding a copy of the model's memory."""
    die_with_parent(parent=getattr(current_process(), "_parent_pid", None))


beat_embedded_init.connect(_beat_dies_with_its_worker)


settings = load_settings()
app = make_celery(settings, name="chitrakar.workers", worker=True)
app.conf.include = ["workers.tasks"]
