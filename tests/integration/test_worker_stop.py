"""A worker asked to stop stops at once when it is idle: nothing in it waits out a timer."""

from __future__ import annotations

import time

from celery.utils.timer2 import Timer

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
