"""Bot ingest: how many `/portrait` commands a second the real `chitrakar bot` acknowledges, and
how fast, when they come from many distinct users at a fixed rate. The bot runs against the Bot
API emulator on loopback, with Redis as the broker and SQLite or PostgreSQL as the store.

    PYTHONPATH=. .venv/bin/python bench/ingest.py [--rate 300] [--seconds 20]
        [--path polling|webhook] [--database sqlite|postgresql] [--workers 0]
        [--intake-process] [--profile bot-profile.txt] [--latencies acks.txt]

Each command comes from a new user in a private chat (so quotas and the per-user limit on jobs
in flight never refuse one). `--path polling`: the emulator holds the updates and answers the
bot's long-polled getUpdates, as Telegram does. `--path webhook`: the bot registers a webhook
and the benchmark posts each update to it (aiohttp, up to 40 connections at once, as Telegram
opens by default).

Acknowledgement: from the update being offered (put in the emulator's queue, or posted) until
the emulator receives the bot's status message ("Queued. Your place in line: …"); the job row
is written and the job published to the broker just after (the status message's id is
recorded with it). Reported: the rate offered and the rate acknowledged (acknowledgements over
the time from the first offer to the last acknowledgement), median, p95 and p99 of the
acknowledgement, and how many were never acknowledged within `--grace` seconds of the last
offer. Target: at least 300 commands a second sustained on 2 cores, p99 under 200 ms.

No worker by default: the acknowledgement does not wait for one, and on 2 cores a worker
(even with the instant generator of bench/instant_worker.py) takes CPU from the bot while it
could never keep up with 300 jobs a second anyway (its handling of a job, content check and
delivery, is about 80 ms). `--workers N` runs N such workers alongside.

CPU: the seconds of CPU each process used while commands were offered (the bot's at 100 %
means one core: its asyncio loop and the threads it hands database work to share one GIL;
with `--intake-process`, the child that takes the commands in is counted as `bot_intake`).
`--profile PATH` samples the bot with py-spy (`pip install py-spy`) for the same window
(`--gil`: only the thread holding the GIL, where CPU goes; with `--profile-idle`, every thread,
waiting ones too: where wall time goes) and writes the folded stacks to PATH; the report lists
where the samples fell.

`--intake-cost N` measures instead, in this process and one command at a time, what the bot
does per command outside python-telegram-bot (ban check, taking the request in, publishing
its job, recording its status message): SQL statements, transactions, commits and CPU
milliseconds per command. With `--intake-batch B`, B commands at a time, through the calls
the Telegram handlers make once for the commands of one turn of the event loop.

Prints one JSON object (milliseconds), then a Markdown table row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.instant_worker import instant_worker_process
from bench.serving_overhead import (
    cpu_seconds,
    deployment,
    machine,
    percentile,
    wait_until_up,
)
from tests.support.botapi import BotApiEmulator
from tests.support.stack import chitrakar_process, free_port

WEBHOOK_SECRET = "bench-webhook-secret"  # noqa: S105 (a test value)
WEBHOOK_PATH = "/telegram/bench-hook"
WEBHOOK_CONNECTIONS = 40  # Telegram's default max_connections
FIRST_USER = 1_000_000


class IndexedEmulator(BotApiEmulator):
    """The emulator, finding a chat by its id in a dict. Its own lookup scans every message
    stored so far for each Bot API call: at thousands of chats that would take the CPU the
    bot needs (the emulator runs in this process, on the same 2 cores)."""

    def __init__(self) -> None:
        super().__init__()
        self._chats: dict[int, dict[str, Any]] = {}

    def _new_message(
        self, chat: dict[str, Any], sender: dict[str, Any] | None = None, **fields: Any
    ) -> dict[str, Any]:
        self._chats.setdefault(chat["id"], chat)
        return super()._new_message(chat, sender, **fields)

    def _chat(self, chat_id: int) -> dict[str, Any]:
        chat = self._chats.get(chat_id)
        return dict(chat) if chat is not None else super()._chat(chat_id)


@dataclass
class Offers:
    """When each chat's command was offered, and what posting it answered (webhook)."""

    at: dict[int, float] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    first: float = 0.0
    last: float = 0.0


def schedule(rate: float, seconds: float) -> Iterator[tuple[int, float]]:
    """(n, when) for each command, on the monotonic clock, starting now."""
    start = time.monotonic()
    for n in range(round(rate * seconds)):
        yield n, start + n / rate


def offer_by_polling(emulator: BotApiEmulator, args: argparse.Namespace) -> Offers:
    offers = Offers()
    for n, when in schedule(args.rate, args.seconds):
        delay = when - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        user = emulator.user(FIRST_USER + n)
        chat = emulator.private_chat(user)
        offers.at[chat["id"]] = time.monotonic()
        emulator.send_text(chat, user, f"/portrait a lighthouse at dawn number {n}")
    return offers


def offer_by_webhook(emulator: BotApiEmulator, url: str, args: argparse.Namespace) -> Offers:
    offers = Offers()
    headers = {"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}

    async def post(session: aiohttp.ClientSession, update: dict[str, Any]) -> None:
        try:
            async with session.post(url, json=update, headers=headers) as response:
                offers.statuses[str(response.status)] += 1
        except aiohttp.ClientError as exc:
            offers.statuses[type(exc).__name__] += 1

    async def offer_all() -> None:
        connector = aiohttp.TCPConnector(limit=WEBHOOK_CONNECTIONS)
        async with aiohttp.ClientSession(connector=connector) as session:
            posts = []
            for n, when in schedule(args.rate, args.seconds):
                delay = when - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                user = emulator.user(FIRST_USER + n)
                chat = emulator.private_chat(user)
                message = emulator.history_message(
                    chat, user, f"/portrait a lighthouse at dawn number {n}"
                )
                update = emulator.update_for(message)
                offers.at[chat["id"]] = time.monotonic()
                posts.append(asyncio.create_task(post(session, update)))
            await asyncio.gather(*posts)

    asyncio.run(offer_all())
    return offers


@dataclass
class Acks:
    at: dict[int, float] = field(default_factory=dict)
    texts: Counter[str] = field(default_factory=Counter)
    seen: int = 0

    def collect(self, emulator: BotApiEmulator, chats: dict[int, float]) -> None:
        """Read the emulator's calls that came since the last look."""
        with emulator._lock:
            new = emulator.calls[self.seen :]
            self.seen = len(emulator.calls)
        for call in new:
            if call.method != "sendMessage" or not isinstance(call.result, dict):
                continue
            chat_id = int(call.params["chat_id"])
            if chat_id in chats and chat_id not in self.at:
                self.at[chat_id] = call.at
                self.texts["status" if call.params["text"].startswith("Queued") else "other"] += 1


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def is_multiprocessing(pid: int) -> bool:
    """A process `multiprocessing` started (spawned: `-c 'from multiprocessing…'`)."""
    try:
        return b"from multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@contextmanager
def profiler(pid: int, seconds: float, output: Path | None, idle: bool) -> Iterator[None]:
    if output is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(output)]
    command += ["--duration", str(round(seconds)), "--rate", "200", "--nonblocking"]
    command += ["--idle"] if idle else ["--gil"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        _, errors = process.communicate(timeout=seconds + 60)
        if process.returncode != 0:
            print(f"py-spy failed: {errors.decode(errors='replace')[-500:]}")


def profile_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """Where the samples fell: by innermost frame (self) and by frame anywhere on the stack
    (inclusive), as shares of all samples."""
    if not path.exists():
        return {}
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames[1:]):  # the first frame is the thread
            inclusive[frame] += count
    share = {"samples": total}

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in counter.most_common(top)}

    return {**share, "self_percent": shares(own), "inclusive_percent": shares(inclusive)}


def intake_cost(
    commands: int, database: str, broker_url: str | None, batch: int = 1
) -> dict[str, Any]:
    """The bot's own work per `/portrait` outside python-telegram-bot, in this process: the
    ban check, taking the request in, publishing its job and recording its status message.
    `batch` 1: one command at a time (`is_banned`, `accept`, `dispatch`,
    `attach_status_message`, as the web chat calls them); more: that many at once, through
    the calls the Telegram handlers' coalescing makes for the commands of one turn of the
    event loop (`are_banned`, `accept_many`, `dispatch_many`, `attach_status_messages`).
    Counts SQL statements, transactions and commits, and CPU time."""
    import tempfile

    from sqlalchemy import event

    from bench.serving_overhead import postgres_database, redis_database
    from bot.bootstrap import bootstrap
    from chitrakar.config import Settings
    from chitrakar.domain import Command, ImageRequest, parse_image_command
    from chitrakar.services import Accepted
    from db.jobs import Origin
    from db.migrate import upgrade_to_head

    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="chitrakar-intake-"))
        url = stack.enter_context(postgres_database()) if database == "postgresql" else None
        broker = broker_url or stack.enter_context(redis_database())
        settings = Settings(data_dir=work, database_url=url, broker_url=broker, _env_file=None)
        upgrade_to_head(settings.resolved_database_url)
        services = bootstrap(settings)
        stack.callback(services.close)
        counts: Counter[str] = Counter()
        for name in ("before_cursor_execute", "begin", "commit"):
            event.listen(services.store.engine, name, lambda *_, n=name: counts.update([n]))

        def request_of(n: int) -> tuple[Origin, ImageRequest]:
            user = str(FIRST_USER + n)
            origin = Origin("telegram", FIRST_USER + n, "private", user, "Asha", "en", 1)
            return origin, parse_image_command(Command.PORTRAIT, f"a lighthouse at dawn {n}")

        def one(n: int) -> None:
            origin, request = request_of(n)
            services.moderation.is_banned("telegram", origin.user_external_id)
            accepted = services.intake.accept(origin, request)
            services.intake.dispatch(accepted)
            services.intake.attach_status_message(accepted.job_id, 2)

        def together(first: int) -> None:
            requests = [request_of(n) for n in range(first, first + batch)]
            users = [origin.user_external_id for origin, _ in requests]
            services.moderation.are_banned("telegram", users)
            taken = services.intake.accept_many(requests)
            accepted = [one for one in taken if isinstance(one, Accepted)]
            assert len(accepted) == batch, taken
            services.intake.dispatch_many(accepted)
            services.intake.attach_status_messages([(one.job_id, 2) for one in accepted])

        def run(first: int, count: int) -> None:
            if batch == 1:
                for n in range(first, first + count):
                    one(n)
            else:
                for start in range(first, first + count, batch):
                    together(start)

        commands -= commands % batch
        run(0, 2 * batch if batch > 1 else 20)  # warm-up: connections, compiled statements
        counts.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        run(10_000, commands)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "machine": machine(),
        "database": database,
        "commands": commands,
        "batch": batch,
        "per_command": {
            "sql_statements": round(counts["before_cursor_execute"] / commands, 1),
            "transactions": round(counts["begin"] / commands, 1),
            "commits": round(counts["commit"] / commands, 1),
            "cpu_ms": round(1000 * cpu / commands, 2),
            "wall_ms": round(1000 * wall / commands, 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--rate", type=float, default=300.0, help="commands offered a second")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to offer them")
    parser.add_argument("--path", choices=("polling", "webhook"), default="polling")
    parser.add_argument(
        "--bots",
        type=int,
        default=1,
        help="bot processes sharing the webhook's port (CHITRAKAR_BOT_PROCESSES; webhook only)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        help="CHITRAKAR_TELEGRAM_POLL_INTERVAL for the bot (polling; default: the setting's)",
    )
    parser.add_argument(
        "--intake-process",
        action="store_true",
        help="each bot process takes commands in through a child process "
        "(CHITRAKAR_BOT_INTAKE_PROCESS); its CPU is reported as bot_intake",
    )
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--broker-url", help="Celery broker (default: an empty database of the Redis at :6379)"
    )
    parser.add_argument("--workers", type=int, default=0, help="instant workers alongside")
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds after the last offer to wait for acks"
    )
    parser.add_argument("--profile", type=Path, help="py-spy the bot; folded stacks to this file")
    parser.add_argument(
        "--latencies",
        type=Path,
        help="write each command's offer time (s from the first) and ack (ms), a line each",
    )
    parser.add_argument(
        "--profile-idle",
        action="store_true",
        help="sample every thread, waiting ones too (where time goes), not only the GIL's holder",
    )
    parser.add_argument(
        "--intake-cost",
        type=int,
        metavar="N",
        help="instead: N commands through the bot's intake in this process, one at a time "
        "(SQL statements, transactions, CPU per command); no emulator, no PTB",
    )
    parser.add_argument(
        "--intake-batch",
        type=int,
        default=1,
        metavar="B",
        help="with --intake-cost: B commands at a time, as the Telegram handlers' coalescing "
        "makes the calls of the commands of one turn of the event loop (it makes at most 16)",
    )
    args = parser.parse_args()
    if args.intake_cost:
        cost = intake_cost(args.intake_cost, args.database, args.broker_url, args.intake_batch)
        print(json.dumps(cost, indent=2))
        return

    if args.bots > 1 and args.path != "webhook":
        parser.error("--bots needs --path webhook: only one process may poll")
    settings: dict[str, str] = {"bot_processes": str(args.bots)}
    if args.poll_interval is not None:
        settings["telegram_poll_interval"] = str(args.poll_interval)
    if args.intake_process:
        settings["bot_intake_process"] = "true"
    hook_url = ""
    if args.path == "webhook":
        port = free_port()
        hook_url = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
        settings |= {
            "web_port": str(port),
            "telegram_webhook_url": hook_url,
            "telegram_webhook_secret": WEBHOOK_SECRET,
        }
    load_before = os.getloadavg()
    with ExitStack() as stack:
        deployed = stack.enter_context(
            deployment(
                "chitrakar-ingest-",
                args.database,
                args.broker_url,
                emulator_class=IndexedEmulator,
                **settings,
            )
        )
        emulator = deployed.emulator
        bot = stack.enter_context(
            chitrakar_process("bot", env=deployed.env, log_dir=deployed.work, echo_log=False)
        )
        workers = [
            stack.enter_context(
                instant_worker_process(
                    "instant",
                    deployed.work / f"timings-worker-{n}.jsonl",
                    env=deployed.env,
                    log_dir=deployed.work,
                    name=f"worker-{n}",
                )
            )
            for n in range(args.workers)
        ]
        wait_until_up(emulator)
        if args.path == "webhook":
            emulator.wait_for("setWebhook", timeout=60)
        time.sleep(2.0)  # workers connected; the bot's first poll under way

        # The other bot processes are the first's children; the intake processes (and
        # multiprocessing's resource tracker), each bot's.
        bots = [bot.pid, *(pid for pid in child_pids(bot.pid) if not is_multiprocessing(pid))]
        processes = {f"worker-{n}": [w.pid] for n, w in enumerate(workers)}
        processes["bot"] = bots
        if args.intake_process:
            processes["bot_intake"] = [
                pid for one in bots for pid in child_pids(one) if is_multiprocessing(pid)
            ]
        cpu_before = {name: sum(map(cpu_seconds, pids)) for name, pids in processes.items()}
        bench_cpu_before = time.process_time()
        started = time.monotonic()
        with profiler(bot.pid, args.seconds, args.profile, args.profile_idle):
            if args.path == "webhook":
                offers = offer_by_webhook(emulator, hook_url, args)
            else:
                offers = offer_by_polling(emulator, args)
        offering = time.monotonic() - started
        cpu = {
            name: sum(map(cpu_seconds, pids)) - cpu_before[name] for name, pids in processes.items()
        }
        cpu["bench_and_emulator"] = time.process_time() - bench_cpu_before

        acks = Acks()
        deadline = time.monotonic() + args.grace
        while True:
            acks.collect(emulator, offers.at)
            if len(acks.at) >= len(offers.at) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        work = str(deployed.work)

    latencies = [(acks.at[c] - t) * 1000 for c, t in offers.at.items() if c in acks.at]
    first_offer = min(offers.at.values())
    if args.latencies:
        lines = (
            f"{t - first_offer:.4f} {(acks.at[c] - t) * 1000:.1f}\n"
            for c, t in sorted(offers.at.items(), key=lambda item: item[1])
            if c in acks.at
        )
        args.latencies.write_text("".join(lines))
    last_ack = max(acks.at.values()) if acks.at else first_offer
    acked_in_window = sum(
        1 for c, t in acks.at.items() if t - offers.at[c] >= 0 and t <= started + offering
    )
    report: dict[str, Any] = {
        "machine": machine(),
        "python": platform.python_version(),
        "path": args.path,
        "intake_process": args.intake_process,
        "database": args.database,
        "workers": args.workers,
        "load_average_before": [round(x, 2) for x in load_before],
        "offered": len(offers.at),
        "offered_per_s": round(len(offers.at) / offering, 1),
        "acked": len(acks.at),
        "acked_per_s": round(len(acks.at) / max(last_ack - first_offer, 1e-9), 1),
        "acked_while_offering_per_s": round(acked_in_window / offering, 1),
        "never_acked": len(offers.at) - len(acks.at),
        "replies": dict(acks.texts),
        "webhook_answers": dict(offers.statuses),
        "ack_ms": {
            "median": round(statistics.median(latencies), 1) if latencies else None,
            "p95": round(percentile(latencies, 0.95), 1) if latencies else None,
            "p99": round(percentile(latencies, 0.99), 1) if latencies else None,
            "max": round(max(latencies), 1) if latencies else None,
        },
        "cpu_percent_while_offering": {k: round(100 * v / offering) for k, v in cpu.items()},
        "logs": work,
    }
    if args.profile:
        report["profile"] = profile_summary(args.profile)
    print(json.dumps(report, indent=2))
    ack = report["ack_ms"]
    print(
        f"| {time.strftime('%Y-%m-%d')} | {os.cpu_count()} cores {platform.machine()}, no GPU, "
        f"{args.database}, Redis, {args.workers} workers | {args.path} | "
        f"{report['offered_per_s']} | {report['acked_per_s']} | "
        f"{ack['median']} ms | {ack['p95']} ms | {ack['p99']} ms | "
        f"{report['never_acked']} | {report['cpu_percent_while_offering']['bot']} % |"
    )


if __name__ == "__main__":
    main()
