"""How long an idle `chitrakar run` takes to stop, worker included: what a user waits for
after Ctrl-C, and a service manager after its stop (and every end-to-end test at its end).

    PYTHONPATH=. .venv/bin/python bench/stop.py --runs 5 [--broker redis://127.0.0.1:6379/14]

Each run starts `chitrakar run` with the tiny model against the Bot API emulator, waits until
its worker says it is ready and then 2 s more, sends SIGTERM to the process group (as a
terminal's Ctrl-C or a service manager does) and times the wait for it to exit. Without
--broker the worker uses the embedded broker. Prints one JSON object with every run and the
median.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.botapi import BotApiEmulator
from tests.support.stack import chitrakar_env, worker_ready
from workers.tiny import make_tiny

# The tree this file is in: the child runs its code, whatever PYTHONPATH said (`.` would be
# the child's working directory, the data dir, and the editable install would win).
ROOT = Path(__file__).resolve().parents[1]


def seconds_to_stop(model: Path, broker: str | None) -> float:
    emulator = BotApiEmulator().start()
    try:
        with tempfile.TemporaryDirectory(prefix="chitrakar-stop-") as folder:
            data_dir = Path(folder)
            extra = {"broker_url": broker} if broker else {}
            env = {**chitrakar_env(emulator, data_dir, model, **extra), "PYTHONPATH": str(ROOT)}
            log_path = data_dir / "run.log"
            with log_path.open("w") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "chitrakar", "run"],
                    env=env,
                    cwd=data_dir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                worker_ready(log_path, timeout=180)
                time.sleep(2)  # idle: every thread waiting as it does between jobs
                started = time.monotonic()
                os.killpg(process.pid, signal.SIGTERM)
                code = process.wait(120)
                seconds = time.monotonic() - started
            if code != 0:
                raise SystemExit(f"`chitrakar run` exited with {code}")
            return seconds
    finally:
        emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--broker", help="a broker URL (default: the embedded broker)")
    parser.add_argument("--model", type=Path, help="a model folder (default: a new tiny one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chitrakar-stop-model-") as folder:
        model = args.model
        if model is None:
            model = Path(folder) / "tiny"
            make_tiny(model)
        runs = [seconds_to_stop(model, args.broker) for _ in range(args.runs)]
    print(
        json.dumps(
            {
                "broker": args.broker or "embedded",
                "runs": [round(s, 3) for s in runs],
                "median_seconds": round(statistics.median(runs), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
