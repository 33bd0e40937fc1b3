"""What the serving path adds to the bare pipeline call: update in → job row → queue → worker →
delivery out, for the real `chitrakar bot` and worker processes against the Bot API emulator
on loopback (Redis as the broker, SQLite or PostgreSQL as the store, the tiny model on CPU).

    PYTHONPATH=. .venv/bin/python bench/serving_overhead.py [--requests 30] [--users 50]
        [--waves 3] [--database sqlite|postgresql] [--phases ...] [--api-latency-ms 0]
        [--gpu-like-ms 200] [--image-size N] [--finish-while-generating auto|on|off]
        [--uplink-mbit N]

Phases, each on fresh users (each user sends one `/portrait`); by default the first three:
- `1-user-model`: one request at a time, the worker running the tiny model (timed exactly);
- `1-user-instant`: one request at a time, the pipeline call replaced by an instant fake
  (bench/instant_worker.py: the real worker, only the diffusers call answers at once);
- `50-users-instant`: waves of `--users` requests offered all at once (a wave is waited out
  before the next), the instant fake again: with the tiny model this would measure mostly
  queueing behind other jobs' denoising;
- `1-user-gpu-like`, `50-users-gpu-like`: the same with a fake that stands for a GPU: it
  waits `--gpu-like-ms` an image without using the CPU and returns photographs
  (bench/instant_worker.py), so that the worker's finishing (content check, PNG, upload) can
  overlap the next call as on a GPU (`--finish-while-generating on`; `auto` is off, the
  device being the CPU). With `--image-size 1024` the PNGs weigh what SDXL's do. Under
  overlap `added` flatters (a job's finishing hidden under the next call is subtracted as
  that call's time): read `wave_images_per_s` and `end_to_end_ms` there.
One worker (Celery's solo pool, as deployed: one process per GPU), one bot, two warm-up
requests before each phase. A sequential request is sent once the previous one's job row is
`done` (the worker records the end just after sending the photo). Progress edits every 3 s,
as deployed.

Added time of a request, the figure this measures:

    added = (photo received by the emulator − update offered to the bot)
            − its own pipeline call
            − the time, inside that window, the worker spent in other jobs' pipeline calls

Pipeline calls are timed exactly in the worker (start and end of the diffusers call, on the
machine's monotonic clock, which the emulator's call times share), not read from
`jobs.generation_seconds` (which also covers the worker's set-up of the call; both are
reported). What remains is what serving adds: Telegram polling, the bot's intake (ban check,
quota, job row), the status message, publishing, the broker, the worker taking the job, saving
the image, the NudeNet content check, recording and sending the photo. Under concurrency it
also holds the time a request waited while the one worker served *other* requests (their
tasks' serving work, not their pipeline calls): that part is reported on its own, as
`waiting_on_others_ms`; `own_path_ms` is the rest. When the worker batches jobs (one pipeline
call for several, `CHITRAKAR_MAX_BATCH_IMAGES`), a job's own pipeline call is the batch's call,
and the time the batch's task spends storing, checking and sending the jobs before this one
counts as its own path. Target: median added under 30 ms.

Also reported: images a second through the whole path for each wave (`wave_images_per_s`,
from its first offer to its last photo; the median of the waves); the median of each stage
(offered → job row → status message → published → the worker's task starts → pipeline → the
worker's "uploading a photo" chat action (image stored, checked, recorded) → photo; job row
and published from the row's timestamps), the content check's time per image, and the
worker's serving time per job (its tasks' time outside pipeline calls, divided by the jobs
made), which bounds one worker's throughput when it finishes inline.

`--api-latency-ms N` answers every Bot API call the bot and worker make on a request's path
(not getUpdates) N ms late, as Telegram's servers do across the internet (a call still counts
as received when it arrives): what a deployment adds for each round trip it waits on.
`--uplink-mbit N` takes each request's uploaded files in as over a link of N Mbit/s, each
request on its own (a photo then counts as received once it would have come through).

Prints one JSON object (milliseconds; p99 of 30 samples is their maximum), then one Markdown
table row per phase for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.engine import make_url

from bench.instant_worker import instant_worker_process
from db.models import Job
from db.session import Store
from tests.conftest import POSTGRES_ADMIN_URL
from tests.support.botapi import BotApiEmulator, Call, Fault
from tests.support.stack import (
    chitrakar_env,
    chitrakar_process,
    fresh_postgres_database,
    run_chitrakar,
    wait_for_jobs,
)

PHASES = (
    "1-user-model",
    "1-user-instant",
    "1-user-gpu-like",
    "50-users-instant",
    "50-users-gpu-like",
)
REDIS_SERVER = "redis://127.0.0.1:6379"
# Redis databases a benchmark may claim: not 15 (tests/conftest.py flushes it), not 0.
REDIS_DATABASES = range(14, 0, -1)
CLAIM_KEY = "chitrakar-bench:claimed"


def percentile(values: list[float], q: float) -> float:
    """Nearest rank, as bench/ack_latency.py."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "median": round(statistics.median(values), 1),
        "p95": round(percentile(values, 0.95), 1),
        "p99": round(percentile(values, 0.99), 1),
    }


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


# -- the deployment ------------------------------------------------------------------------


@contextmanager
def redis_database(server: str = REDIS_SERVER) -> Iterator[str]:
    """An empty database of the shared Redis, claimed for this run, emptied afterwards."""
    for number in REDIS_DATABASES:
        client = redis.Redis.from_url(f"{server}/{number}")
        try:
            if client.dbsize() == 0 and client.set(CLAIM_KEY, os.getpid(), nx=True):
                try:
                    yield f"{server}/{number}"
                finally:
                    client.flushdb()
                return
        finally:
            client.close()
    raise RuntimeError(f"no empty Redis database at {server}")


def postgres_database() -> AbstractContextManager[str]:
    """A fresh PostgreSQL database on the tests' server, dropped afterwards."""
    return fresh_postgres_database(POSTGRES_ADMIN_URL)


@dataclass
class Deployment:
    work: Path
    emulator: BotApiEmulator
    env: dict[str, str]
    database_url: str
    broker_url: str
    model: Path


@contextmanager
def deployment(
    prefix: str,
    database: str,
    broker_url: str | None,
    emulator_class: type[BotApiEmulator] = BotApiEmulator,
    **settings: str,
) -> Iterator[Deployment]:
    """A store (upgraded), a broker, the tiny model and the emulator; no processes yet."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    with ExitStack() as stack:
        if database == "postgresql":
            database_url = stack.enter_context(postgres_database())
        else:
            database_url = f"sqlite:///{work / 'chitrakar.db'}"
        broker = broker_url or stack.enter_context(redis_database())
        emulator = emulator_class().start()
        stack.callback(emulator.stop)
        model = work / "tiny"
        env = chitrakar_env(
            emulator,
            work,
            model,
            database_url=database_url,
            broker_url=broker,
            progress_interval="3",  # as deployed
            **settings,
        )
        for command in (("model", "make-tiny", str(model)), ("db", "upgrade")):
            done = run_chitrakar(*command, env=env, cwd=work)
            if done.returncode != 0:
                raise RuntimeError(f"chitrakar {' '.join(command)} failed: {done.stderr}")
        yield Deployment(work, emulator, env, database_url, broker, model)


def wait_until_up(emulator: BotApiEmulator, timeout: float = 120) -> None:
    emulator.wait_for("setMyCommands", lambda c: c.params.get("language_code") == "hi", timeout)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_calls(calls: list[Call], method: str) -> dict[int, Call]:
    """The first successful call to `method` in each chat."""
    found: dict[int, Call] = {}
    for call in calls:
        if call.method == method and not isinstance(call.result, Exception | Fault):
            found.setdefault(int(call.params["chat_id"]), call)
    return found


# -- one request ---------------------------------------------------------------------------


@dataclass
class Offer:
    chat_id: int
    message_id: int
    tag: str
    offered: float


@dataclass
class Interval:
    start: float
    end: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def overlap(self, start: float, end: float) -> float:
        return max(0.0, min(self.end, end) - max(self.start, start))


def offer_portrait(emulator: BotApiEmulator, user_id: int, tag: str) -> Offer:
    user = emulator.user(user_id)
    chat = emulator.private_chat(user)
    offered = time.monotonic()
    message = emulator.send_text(chat, user, f"/portrait a tea stall at dusk {tag}")
    return Offer(chat["id"], message["message_id"], tag, offered)


def read_timings(paths: list[Path]) -> dict[str, list[Interval]]:
    events: dict[str, list[Interval]] = {"pipeline": [], "classify": [], "job": []}
    for path in paths:
        if path.exists():
            for line in path.read_text().splitlines():
                event = json.loads(line)
                events[event.pop("what")].append(
                    Interval(event.pop("start"), event.pop("end"), event)
                )
    return events


def as_monotonic(moment: datetime | None, offset: float) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite keeps no zone; the store writes UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() - offset


def job_rows(database_url: str) -> dict[tuple[int, int], Any]:
    store = Store(database_url)
    try:
        with store.unit_of_work() as uow:
            rows = uow.session.execute(
                select(
                    Job.id,
                    Job.chat_id,
                    Job.request_message_id,
                    Job.status,
                    Job.created_at,
                    Job.published_at,
                    Job.started_at,
                    Job.delivered_at,
                    Job.generation_seconds,
                )
            ).all()
    finally:
        store.dispose()
    return {(row.chat_id, row.request_message_id): row for row in rows}


def measure(
    offers: list[Offer],
    calls: list[Call],
    events: dict[str, list[Interval]],
    rows: dict[tuple[int, int], Any],
    clock_offset: float,
) -> list[dict[str, float]]:
    """Per answered request: the added time and where it went, in milliseconds."""
    acks, photos = first_calls(calls, "sendMessage"), first_calls(calls, "sendPhoto")
    # The worker says "uploading a photo" once the image is stored, checked and recorded.
    uploading = first_calls(calls, "sendChatAction")
    measured = []
    for offer in offers:
        photo, ack = photos.get(offer.chat_id), acks.get(offer.chat_id)
        row = rows.get((offer.chat_id, offer.message_id))
        if photo is None or ack is None or row is None:
            continue
        start, end = offer.offered, photo.at
        own = [p for p in events["pipeline"] if any(offer.tag in str(x) for x in p.info["prompts"])]
        if not own:
            continue
        # The task whose run made this job's images: its own, or a batch leader's.
        runs = [j for j in events["job"] if j.start <= own[0].start <= j.end]
        if not runs:
            continue
        run = runs[0]
        others_pipeline = sum(p.overlap(start, end) for p in events["pipeline"] if p not in own)
        others_runs = sum(j.overlap(start, end) for j in events["job"] if j is not run)
        own_pipeline = sum(p.seconds for p in own)
        added = (end - start) - own_pipeline - others_pipeline
        waiting = others_runs - others_pipeline
        created = as_monotonic(row.created_at, clock_offset)
        published = as_monotonic(row.published_at, clock_offset)
        stages = {
            "offered_to_job_row": (created or start) - start,
            "offered_to_status_message": ack.at - start,
            "status_message_to_published": (published or ack.at) - ack.at,
            "published_to_worker_start": run.start - (published or ack.at),
            "worker_start_to_pipeline": own[0].start - run.start,
            "pipeline_end_to_photo": end - own[-1].end,
        }
        if (action := uploading.get(offer.chat_id)) is not None:
            stages["pipeline_end_to_upload_action"] = action.at - own[-1].end
            stages["upload_action_to_photo"] = end - action.at
        measured.append(
            {
                "added": added * 1000,
                "waiting_on_others": waiting * 1000,
                "own_path": (added - waiting) * 1000,
                "end_to_end": (end - start) * 1000,
                "pipeline": own_pipeline * 1000,
                "generation_seconds": (row.generation_seconds or 0.0) * 1000,
                "batch_size": float(sum(len(p.info["prompts"]) for p in own)),
                **{f"stage:{k}": v * 1000 for k, v in stages.items()},
            }
        )
    return measured


# -- the phases ----------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    generator: str
    offers: list[Offer] = field(default_factory=list)
    waves: list[list[Offer]] = field(default_factory=list)
    seconds: float = 0.0
    timings: Path | None = None


# What the bot and the worker call on a request's path, answered `--api-latency-ms` late (a
# call is recorded, and counts as received, on arrival).
ANSWERED_LATE = (
    "sendMessage",
    "sendChatAction",
    "sendPhoto",
    "sendMediaGroup",
    "editMessageText",
    "deleteMessage",
)


def in_chat(chat_id: int) -> Callable[[Call], bool]:
    return lambda call: call.params.get("chat_id") == chat_id


def run_phase(
    stack: Deployment, phase: Phase, next_user: Callable[[], int], args: argparse.Namespace
) -> None:
    emulator = stack.emulator
    phase.timings = stack.work / f"timings-{phase.name}.jsonl"
    with instant_worker_process(
        phase.generator,
        phase.timings,
        env=stack.env,
        log_dir=stack.work,
        name=phase.name,
        gpu_like_ms=args.gpu_like_ms,
    ):
        for n in range(2):  # warm-up: model, content check, connections
            warm = offer_portrait(emulator, next_user(), f"warmup{n}{phase.name}")
            emulator.wait_for("sendPhoto", in_chat(warm.chat_id), 180)
        started = time.monotonic()
        if phase.name.startswith("1-user"):
            for n in range(args.requests):
                offer = offer_portrait(emulator, next_user(), f"req{n:05d}x")
                phase.offers.append(offer)
                emulator.wait_for("sendPhoto", in_chat(offer.chat_id), 120)
                # One user at a time: the worker has recorded this job's end (after sending
                # the photo) before the next request comes.
                wait_for_jobs(stack.database_url, offer.chat_id, "done")
        else:
            for wave in range(args.waves):
                users = [next_user() for _ in range(args.users)]
                wave_offers = [
                    offer_portrait(emulator, user, f"w{wave}u{n:04d}x")
                    for n, user in enumerate(users)
                ]
                phase.offers += wave_offers
                for offer in wave_offers:
                    emulator.wait_for("sendPhoto", in_chat(offer.chat_id), 300)
                phase.waves.append(wave_offers)
                time.sleep(1.0)  # the worker records the last job's end
        phase.seconds = time.monotonic() - started
        time.sleep(1.0)


def report_phase(
    phase: Phase, stack: Deployment, rows: dict[tuple[int, int], Any], clock_offset: float
) -> dict[str, Any]:
    assert phase.timings is not None
    events = read_timings([phase.timings])
    with stack.emulator._lock:
        calls = list(stack.emulator.calls)
    measured = measure(phase.offers, calls, events, rows, clock_offset)
    keys = dict.fromkeys(key for m in measured for key in m)
    series = {key: [m[key] for m in measured if key in m] for key in keys}
    stages = {
        key.removeprefix("stage:"): round(statistics.median(values), 1)
        for key, values in series.items()
        if key.startswith("stage:")
    }
    return {
        "requests": len(phase.offers),
        "measured": len(measured),
        "seconds": round(phase.seconds, 1),
        "added_ms": summary(series.get("added", [])),
        "end_to_end_ms": summary(series.get("end_to_end", [])),
        "pipeline_ms": summary(series.get("pipeline", [])),
        "generation_seconds_column_ms": summary(series.get("generation_seconds", [])),
        "waiting_on_others_ms": summary(series.get("waiting_on_others", [])),
        "own_path_ms": summary(series.get("own_path", [])),
        "batch_size": summary(series.get("batch_size", [])),
        "worker_serving_per_job_ms": worker_serving_per_job(events),
        "wave_images_per_s": wave_images_per_s(phase.waves, calls),
        # A job's images are checked in one run of the model: each gets its share.
        "content_check_per_image_ms": summary(
            [c.seconds * 1000 / c.info.get("images", 1) for c in events["classify"]]
        ),
        "stage_medians_ms": stages,
    }


def worker_serving_per_job(events: dict[str, list[Interval]]) -> float:
    """The worker's time in its tasks but outside pipeline calls, per job made (warm-ups
    included): what one worker spends serving a job, which bounds its throughput."""
    made = sum(len(p.info["prompts"]) for p in events["pipeline"])
    busy = sum(j.seconds for j in events["job"]) - sum(p.seconds for p in events["pipeline"])
    return round(1000 * busy / max(made, 1), 1)


def wave_images_per_s(waves: list[list[Offer]], calls: list[Call]) -> float | None:
    """Images a second through the whole path, from a wave's first offer to its last photo
    (median of the waves); one image a request."""
    photos = first_calls(calls, "sendPhoto")
    rates = []
    for wave in waves:
        ends = [photos[offer.chat_id].at for offer in wave if offer.chat_id in photos]
        if ends:
            rates.append(len(ends) / (max(ends) - min(offer.offered for offer in wave)))
    return round(statistics.median(rates), 2) if rates else None


def markdown_row(name: str, result: dict[str, Any], note: str) -> str:
    added, e2e = result["added_ms"], result["end_to_end_ms"]
    check = result["content_check_per_image_ms"].get("median", float("nan"))
    return (
        f"| {time.strftime('%Y-%m-%d')} | {note} | {name} | {result['measured']} | "
        f"{added['median']} ms | {added['p99']} ms | {e2e['median']} ms | "
        f"{result['pipeline_ms']['median']} ms | {check} ms |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--requests", type=int, default=30, help="sequential requests per phase")
    parser.add_argument("--users", type=int, default=50, help="concurrent users per wave")
    parser.add_argument("--waves", type=int, default=3, help="waves of concurrent users")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--broker-url", help="Celery broker (default: an empty database of the Redis at :6379)"
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}"
    )
    parser.add_argument(
        "--intake-process",
        action="store_true",
        help="the bot takes commands in through a child process (CHITRAKAR_BOT_INTAKE_PROCESS)",
    )
    parser.add_argument(
        "--api-latency-ms",
        type=float,
        default=0.0,
        help="answer every Bot API call but getUpdates this late (Telegram's round trip)",
    )
    parser.add_argument(
        "--uplink-mbit",
        type=float,
        help="take each upload in as over a link of this many Mbit/s (the bot's uplink)",
    )
    parser.add_argument(
        "--gpu-like-ms",
        type=float,
        default=200.0,
        help="the gpu-like generator's time an image (200: SDXL Lightning compiled, an H100)",
    )
    parser.add_argument(
        "--image-size", type=int, help="CHITRAKAR_IMAGE_SIZE (default: the tests' 64)"
    )
    parser.add_argument(
        "--finish-while-generating",
        choices=("auto", "on", "off"),
        default="auto",
        help="CHITRAKAR_FINISH_WHILE_GENERATING of the worker (auto: off, on a CPU)",
    )
    args = parser.parse_args()
    phases = [Phase(name, name.split("-", 2)[-1]) for name in args.phases.split(",")]
    if unknown := {p.name for p in phases} - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")

    clock_offset = time.time() - time.monotonic()
    load_before = os.getloadavg()
    user_ids = iter(range(20_000, 10**9))
    settings = {"bot_intake_process": "true"} if args.intake_process else {}
    settings["finish_while_generating"] = args.finish_while_generating
    if args.image_size is not None:
        settings["image_size"] = str(args.image_size)
    with deployment("chitrakar-overhead-", args.database, args.broker_url, **settings) as stack:
        with chitrakar_process("bot", env=stack.env, log_dir=stack.work, echo_log=False):
            wait_until_up(stack.emulator)
            for method in ANSWERED_LATE:
                stack.emulator.delay(method, args.api_latency_ms / 1000)
            if args.uplink_mbit:
                stack.emulator.limit_uplink(args.uplink_mbit * 1e6 / 8)
            for phase in phases:
                run_phase(stack, phase, lambda: next(user_ids), args)
        rows = job_rows(stack.database_url)
        results = {phase.name: report_phase(phase, stack, rows, clock_offset) for phase in phases}
        broker = make_url(stack.broker_url).render_as_string()
        work = str(stack.work)
    report = {
        "machine": machine(),
        "python": platform.python_version(),
        "database": args.database,
        "broker": broker,
        "api_latency_ms": args.api_latency_ms,
        "uplink_mbit": args.uplink_mbit,
        "intake_process": args.intake_process,
        "finish_while_generating": args.finish_while_generating,
        "image_size": args.image_size,
        "gpu_like_ms": args.gpu_like_ms,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "logs": work,
        "phases": results,
    }
    print(json.dumps(report, indent=2))
    note = f"{os.cpu_count()} cores {platform.machine()}, no GPU, {args.database}, Redis"
    for name, result in results.items():
        if result["measured"]:
            print(markdown_row(name, result, note))


if __name__ == "__main__":
    main()
