"""The embedded broker under a reader and a writer at once: real kombu connections on the
data dir's folders, configured as Celery configures them."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from kombu.simple import SimpleQueue

from chitrakar.config import Settings
from chitrakar.queue import make_celery

# A queue of its own per test: kombu keeps exchanges it has declared in memory, per process,
# whatever the folder.
_queue_names = (f"chitrakar.test-{n}" for n in itertools.count())
# Large enough that encoding one takes a while: kombu's own transport showed the empty file
# it had created to a reader during that time.
BIG = 4_000_000
MESSAGES = 12


def connection(data_dir: Path) -> Connection:
    return make_celery(Settings(data_dir=data_dir)).connection_for_write()


def next_message(queue: SimpleQueue, timeout: float = 30) -> Any:
    """Take a message as a worker does, looking again at once whenever the folder is empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = queue.get_nowait()
        except queue.Empty:
            continue
        message.ack()
        return message.payload
    raise AssertionError("no message came")


# The bot's side, in a process of its own as in a deployment (in a thread, json's encoder
# would hold the GIL and keep the reader from looking at the wrong moment).
PUBLISHER = """
import sys
import threading
from pathlib import Path
from chitrakar.config import Settings
from chitrakar.queue import make_celery
data_dir, name, count, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with make_celery(Settings(data_dir=data_dir)).connection_for_write() as writer:
    queue = writer.SimpleQueue(name)
    for number in range(count):
        queue.put({"number": number, "padding": "p" * size})
"""


def test_a_reader_never_sees_a_message_before_it_is_whole(tmp_path: Path) -> None:
    name = next(_queue_names)
    with connection(tmp_path) as reader:
        queue = reader.SimpleQueue(name)
        publisher = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(tmp_path), name, str(MESSAGES), str(BIG)]
        )
        try:
            # Looking again without a pause, as a worker with nothing to do does.
            received = [next_message(queue) for _ in range(MESSAGES)]
            publisher.wait(timeout=60)
        finally:
            if publisher.poll() is None:
                publisher.kill()
                publisher.wait()
    assert publisher.returncode == 0
    assert [m["number"] for m in received] == list(range(MESSAGES))
    assert all(len(m["padding"]) == BIG for m in received)
    # Nothing is left behind in the staging folder.
    assert list((tmp_path / "broker" / "staging").iterdir()) == []


@pytest.mark.parametrize("junk", [b"", b'{"body": "cut sh', b"{}", b"[1, 2]"])
def test_a_file_that_is_not_a_message_is_skipped_not_fatal(
    tmp_path: Path, junk: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    name = next(_queue_names)
    with connection(tmp_path) as client:
        queue = client.SimpleQueue(name)
        # Named as the broker names messages, and sorted before the real one.
        (tmp_path / "broker" / "queue" / f"{0:015d}_junk.{name}.msg").write_bytes(junk)
        queue.put({"number": 7})
        with caplog.at_level(logging.ERROR, logger="chitrakar.filesystem_broker"):
            assert next_message(queue) == {"number": 7}
    assert any(f"queue {name}" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "broker" / "queue" / f"{0:015d}_junk.{name}.msg").exists()


def test_messages_are_taken_in_order_across_a_change_in_the_clocks_number_of_digits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names are sorted as text: 9999 ms must still come before 10000 ms (a machine up for
    ten seconds, or 2.8 hours, crosses such a boundary). CI failed here once, by uptime."""
    import chitrakar.filesystem_broker as broker

    clock = iter([9.998, 9.999, 10.0, 10.001])
    monkeypatch.setattr(broker, "monotonic", lambda: next(clock))
    name = next(_queue_names)
    with connection(tmp_path) as client:
        queue = client.SimpleQueue(name)
        for number in range(4):
            queue.put({"number": number})
        assert [next_message(queue)["number"] for _ in range(4)] == [0, 1, 2, 3]


def test_a_workers_wait_for_messages_ends_soon_and_everyone_elses_lasts_as_asked(
    tmp_path: Path,
) -> None:
    """Celery's worker loop waits 2 s a turn and looks for a stop request only between turns:
    on a worker's connection a turn ends within a quarter of a second. Any other connection
    waits as long as it asks, and a wait without a timeout lasts until a message comes."""
    name = next(_queue_names)
    settings = Settings(data_dir=tmp_path)
    received: list[Any] = []

    def take(body: Any, message: Any) -> None:
        received.append(body)
        message.ack()

    with make_celery(settings, worker=True).connection_for_write() as worker:
        queue = worker.SimpleQueue(name)  # declares the queue
        with worker.Consumer(queue.queue, callbacks=[take]):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                worker.drain_events(timeout=2.0)
            assert time.monotonic() - started < 1.0

            late = threading.Timer(0.8, lambda: queue.put({"number": 1}))
            late.start()
            try:
                worker.drain_events()
            finally:
                late.join()
    assert received == [{"number": 1}]

    with connection(tmp_path) as client:
        plain = client.SimpleQueue(name)
        started = time.monotonic()
        with pytest.raises(plain.Empty):
            plain.get(timeout=1.0)
        assert time.monotonic() - started >= 0.9
