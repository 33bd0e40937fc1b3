"""The embedded broker's cost per message: how long the bot takes to publish one job through
kombu's filesystem transport, with Chitrakar's writer (staged, then renamed into the queue
folder whole) or kombu's own (written in place, which a worker could read half-written), and
how long a worker takes to read one back.

    PYTHONPATH=. .venv/bin/python bench/embedded_broker.py [--messages 2000] [--runs 5]

Each run publishes `--messages` generate tasks with `publish_generate` (as the bot does) into a
fresh data dir, then drains them with a kombu consumer on the same folders (as the worker's
consumer reads them). Reported: per transport, the median over the runs of the microseconds
per published and per read message. Prints one JSON object, then Markdown table rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from kombu import Consumer, Queue
from kombu.message import Message

from chitrakar.config import Settings
from chitrakar.filesystem_broker import TRANSPORT
from chitrakar.queue import QUEUE, make_celery, publish_generate

TRANSPORTS = {"chitrakar": TRANSPORT, "kombu": "filesystem"}


def one_run(transport: str, messages: int) -> tuple[float, float]:
    """Microseconds per published and per read message."""
    with tempfile.TemporaryDirectory() as folder:
        app = make_celery(Settings(data_dir=Path(folder)))
        app.conf.broker_transport = TRANSPORTS[transport]
        started = time.perf_counter()
        for job_id in range(messages):
            publish_generate(app, job_id)
        published = time.perf_counter() - started
        read = 0

        def on_message(_body: object, message: Message) -> None:
            nonlocal read
            read += 1
            message.ack()

        with app.connection_for_read() as connection:
            queue = Queue(QUEUE)
            with Consumer(connection, [queue], callbacks=[on_message], accept=["json"]):
                started = time.perf_counter()
                while read < messages:
                    connection.drain_events(timeout=5)
                drained = time.perf_counter() - started
        return published / messages * 1e6, drained / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    report: dict[str, dict[str, float]] = {}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in TRANSPORTS}
    for _ in range(args.runs):  # alternating, so that the machine's state is shared
        for name in TRANSPORTS:
            runs[name].append(one_run(name, args.messages))
    for name, results in runs.items():
        report[name] = {
            "publish_us": round(statistics.median(r[0] for r in results), 1),
            "read_us": round(statistics.median(r[1] for r in results), 1),
        }
    print(json.dumps({"messages": args.messages, "runs": args.runs, **report}))
    machine = f"{platform.machine()}, Python {platform.python_version()}"
    for name, figures in report.items():
        print(
            f"| {time.strftime('%Y-%m-%d')} | {machine} | {name} | "
            f"{figures['publish_us']} µs | {figures['read_us']} µs |"
        )


if __name__ == "__main__":
    main()
