"""A worker asked to stop stops at once when it is idle: nothing in it waits out a timer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from celery.utils.timer2 import Timer

from chitrakar.cli import celery_worker
from chitrakar.config import Settings
from chitrakar.filesystem_broker import WAIT_CAP_OPTION
from chitrakar.queue import WORKER_WAIT_CAP_S, make_celery
from workers.celery_app import TIMER_WAKE_S, PromptTimer


def _seconds_to_stop(timer: Timer) -> float:
    timer.ensure_started()
    time.sleep(0.3)  # the thread is waiting by now
    started = time.monotonic()
    timer.stop()
    return time.monotonic() - started


def test_the_workers_timer_thread_stops_within_its_wake_interval() -> None:
    # Celery's own timer, with nothing scheduled, waits a second at a time before it looks
    # at its stop flag (0.7 s more here); the worker's is woken every TIMER_WAKE_S.
    assert _seconds_to_stop(PromptTimer(max_interval=1.0)) < TIMER_WAKE_S + 0.4


# Celery warns when a worker is built as root, as the test machines run.
@pytest.mark.filterwarnings("ignore::celery.exceptions.SecurityWarning")
def test_the_worker_program_runs_with_the_prompt_timer_and_capped_waits(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    worker = celery_worker(make_celery(settings, worker=True), settings, beat=False)
    try:
        assert worker.timer_cls is PromptTimer
        options = worker.app.conf.broker_transport_options
        assert options[WAIT_CAP_OPTION] == WORKER_WAIT_CAP_S
        # The bot's app waits as long as it asks.
        assert WAIT_CAP_OPTION not in make_celery(settings).conf.broker_transport_options
    finally:
        if isinstance(getattr(worker, "timer", None), PromptTimer):
            worker.timer.stop()
