"""Jobs published together (the bot's batch of the commands of one turn of its event loop)
reach the queue a worker reads, in order, as the tasks a worker runs: on Redis, in one
pipeline, and on the embedded filesystem broker, one message at a time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from chitrakar.config import Settings
from chitrakar.queue import GENERATE_TASK, QUEUE, make_celery, publish_generate_many


def received(
    settings: Settings, count: int, timeout: float = 30
) -> list[tuple[str, list[int], str]]:
    """Take `count` messages from the generate queue as a worker would: task name, args and
    how the args are shown (the worker's log)."""
    app = make_celery(settings)
    taken: list[tuple[str, list[int], str]] = []
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(QUEUE)
        deadline = time.monotonic() + timeout
        while len(taken) < count and time.monotonic() < deadline:
            try:
                message = queue.get(timeout=1)
            except queue.Empty:
                continue
            args, _kwargs, _embed = message.decode()
            taken.append((message.headers["task"], args, message.headers["argsrepr"]))
            message.ack()
        queue.close()
    return taken


@pytest.mark.parametrize("broker", ["redis", "filesystem"])
def test_jobs_published_together_reach_the_workers_queue_in_order(
    broker: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_url") if broker == "redis" else None
    settings = Settings(data_dir=tmp_path, broker_url=url, _env_file=None)
    # Enough that several are written within one millisecond.
    job_ids = list(range(100, 120))
    publish_generate_many(make_celery(settings), job_ids)
    assert received(settings, len(job_ids)) == [
        (GENERATE_TASK, [job_id], f"[{job_id}]") for job_id in job_ids
    ]
