"""A worker's embedded beat (`chitrakar worker --beat`, as `chitrakar run` starts it) is a
fork of the worker: it must not outlive a worker that was killed."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.support.stack import (
    chitrakar_env,
    chitrakar_process,
    process_running,
    run_chitrakar,
    wait_until_gone,
)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _ready_with_a_child(pid: int, log: Path, timeout: float = 120) -> int:
    """The worker's one child (its beat) once the worker takes tasks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process_running(pid), log.read_text(errors="replace")[-3000:]
        children = _children(pid)
        if " ready." in log.read_text(errors="replace") and children:
            [child] = children
            return child
        time.sleep(0.2)
    raise AssertionError("the worker did not become ready with its beat")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_embedded_beat_goes_when_its_worker_is_killed(tmp_path: Path, tiny_model: Path) -> None:
    env = chitrakar_env(None, tmp_path, tiny_model)
    assert run_chitrakar("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    beat: int | None = None
    try:
        with chitrakar_process("worker", "--beat", env=env, log_dir=tmp_path) as worker:
            beat = _ready_with_a_child(worker.pid, tmp_path / "worker---beat.log")
            # The beat has asked for its signal by now: it does so before its first tick.
            time.sleep(1)
            os.kill(worker.pid, signal.SIGKILL)  # the OOM killer, say
            worker.wait(10)
            wait_until_gone(beat, 5)
    finally:
        if beat is not None and process_running(beat):
            os.kill(beat, signal.SIGKILL)
