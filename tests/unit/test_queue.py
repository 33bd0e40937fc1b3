"""The queue contract: the periodic retention sweep is scheduled and a worker runs it."""

from __future__ import annotations

from pathlib import Path

from chitrakar.cli import build_parser
from chitrakar.config import Settings
from chitrakar.queue import (
    HAND_OVER_EVERY_S,
    HAND_OVER_TASK,
    QUEUE,
    RETENTION_SWEEP_EVERY_S,
    RETENTION_TASK,
    celery_config,
)


def test_beat_schedules_the_sweep_and_the_hand_over_of_held_jobs(tmp_path: Path) -> None:
    config = celery_config(Settings(data_dir=tmp_path))
    entries = {
        (entry["task"], entry["schedule"], entry["options"]["queue"])
        for entry in config["beat_schedule"].values()
    }
    assert entries == {
        (RETENTION_TASK, RETENTION_SWEEP_EVERY_S, QUEUE),
        (HAND_OVER_TASK, HAND_OVER_EVERY_S, QUEUE),
    }
    assert config["beat_schedule_filename"].startswith(str(tmp_path))


def test_the_worker_registers_the_sweep_and_run_starts_it_with_beat() -> None:
    from workers.tasks import app

    assert RETENTION_TASK in app.tasks and HAND_OVER_TASK in app.tasks
    assert build_parser().parse_args(["worker", "--beat"]).beat
    assert build_parser().parse_args(["retention", "sweep"]).func.__name__ == (
        "cmd_retention_sweep"
    )
