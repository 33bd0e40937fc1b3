"""How fast a user hears back: `chitrakar run` (SQLite, embedded broker, tiny model) against
the Bot API emulator on loopback, one `/portrait` at a time.

    PYTHONPATH=. .venv/bin/python bench/ack_latency.py [--requests 30]

- ack: from the update being offered to the bot until its status message ("Queued…") arrives;
- done: until the photo arrives (the tiny model's generation is about a tenth of this).
Prints one JSON object with medians and 95th percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from tests.support.botapi import BotApiEmulator
from tests.support.stack import chitrakar_env, chitrakar_process
from workers.tiny import make_tiny


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="chitrakar-bench-"))
    model = make_tiny(work / "tiny")
    emulator = BotApiEmulator().start()
    env = chitrakar_env(emulator, work / "data", model)
    env["CHITRAKAR_PROGRESS_INTERVAL"] = "3"  # as deployed
    acks: list[float] = []
    totals: list[float] = []
    with chitrakar_process("run", env=env, log_dir=work, echo_log=False):
        emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", 120)
        for i in range(args.requests):
            user = emulator.user(10_000 + i)
            chat = emulator.private_chat(user)
            started = time.monotonic()
            emulator.send_text(chat, user, "/portrait a tea stall at dusk")
            status = emulator.wait_for(
                "sendMessage", lambda c, cid=chat["id"]: c.params["chat_id"] == cid
            )
            photo = emulator.wait_for(
                "sendPhoto", lambda c, cid=chat["id"]: c.params["chat_id"] == cid
            )
            acks.append((status.at - started) * 1000)
            totals.append((photo.at - started) * 1000)
    emulator.stop()
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "requests": args.requests,
                "ack_ms": {
                    "median": round(statistics.median(acks), 1),
                    "p95": round(percentile(acks, 0.95), 1),
                },
                "done_ms": {
                    "median": round(statistics.median(totals), 1),
                    "p95": round(percentile(totals, 0.95), 1),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
