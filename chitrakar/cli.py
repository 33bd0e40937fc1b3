"""The `chitrakar` command. Each sub-command reads the settings once and starts one part;
the bot and worker modules are imported only by the sub-command that runs them."""

from __future__ import annotations

import argparse
import functools
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from threading import Event
from typing import TYPE_CHECKING, TypeVar

from chitrakar.config import Settings, SettingsError, load_settings
from chitrakar.process import configure_logging, die_with_parent

if TYPE_CHECKING:
    from celery import Celery
    from celery.apps.worker import Worker as CeleryWorker

    from chitrakar.capacity import Measurement
    from db.session import UnitOfWork

T = TypeVar("T")

log = logging.getLogger("chitrakar")

# The web chat account `chitrakar run` prints a sign-in link for.
OWNER_ACCOUNT = "owner"
USER_NAME = re.compile(r"[a-z0-9._@+-]{1,64}")
# How long `chitrakar run` lets its worker finish the job in hand when stopping.
WORKER_STOP_TIMEOUT_S = 300
# A bot process finishes the updates it holds (each a few database writes and Bot API calls).
BOT_STOP_TIMEOUT_S = 30

TELEGRAM_SETUP_GUIDE = """\
CHITRAKAR_TELEGRAM_TOKEN is not set and the web chat is off (CHITRAKAR_WEB_CHAT=false), so
there is no chat to serve. Turn the web chat on, or connect a Telegram bot.

To connect a Telegram bot:
  1. In Telegram, open @BotFather, send /newbot and follow its questions.
  2. Copy the token it gives you (it looks like 123456789:AA...).
  3. Put it in a file named .env here:   CHITRAKAR_TELEGRAM_TOKEN=123456789:AA...
     (or export it in your shell), then run this command again.
"""


def _require_current_schema(settings: Settings) -> None:
    from db.migrate import schema_is_current

    if not schema_is_current(settings.resolved_database_url):
        raise SystemExit("The database schema is not up to date: run `chitrakar db upgrade` first.")


def _require_a_chat(settings: Settings) -> None:
    """Something to serve: the web chat, or Telegram."""
    if settings.telegram_token is None and not settings.web_chat:
        print(TELEGRAM_SETUP_GUIDE, file=sys.stderr)
        raise SystemExit(2)


def _require_valid_catalogue(settings: Settings) -> None:
    from chitrakar.styles import CatalogueError, load_catalogue

    try:
        load_catalogue(settings.styles_file)
    except CatalogueError as exc:
        raise SystemExit(f"The style catalogue is not valid: {exc}") from None


def cmd_styles_check(settings: Settings, _: argparse.Namespace) -> int:
    """Validate the catalogue with its overrides, and say which LoRA files are missing."""
    from chitrakar.styles import CatalogueError, load_catalogue

    try:
        catalogue = load_catalogue(settings.styles_file)
    except CatalogueError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    missing = 0
    for style in catalogue.styles.values():
        note = ""
        if style.lora is not None:
            found = style.lora.is_file()
            missing += not found
            note = f"  LoRA {style.lora}" + ("" if found else " (MISSING: used without it)")
        print(f"{style.key:24} {style.name_in('en')}{note}")
    print(f"{len(catalogue.styles)} styles; default {catalogue.default_style.key}")
    return 1 if missing else 0


def cmd_db_upgrade(settings: Settings, _: argparse.Namespace) -> int:
    from db.migrate import upgrade_to_head

    upgrade_to_head(settings.resolved_database_url)
    log.info("database is up to date")
    return 0


def cmd_bot(settings: Settings, _: argparse.Namespace) -> int:
    _require_a_chat(settings)
    _require_valid_catalogue(settings)
    if settings.telegram_webhook_url and settings.telegram_webhook_secret is None:
        raise SystemExit(
            "CHITRAKAR_TELEGRAM_WEBHOOK_URL is set but CHITRAKAR_TELEGRAM_WEBHOOK_SECRET is not: "
            "set a random secret (1-256 characters: A-Z, a-z, 0-9, _ and -)."
        )
    if settings.bot_processes > 1 and settings.telegram_token and not settings.telegram_webhook_url:
        raise SystemExit(
            f"CHITRAKAR_BOT_PROCESSES={settings.bot_processes} needs the webhook "
            "(CHITRAKAR_TELEGRAM_WEBHOOK_URL): with polling only one process may read "
            "Telegram's updates. Set the webhook, or CHITRAKAR_BOT_PROCESSES=1."
        )
    _require_current_schema(settings)
    from bot.server import run

    if settings.bot_process_index > 0:
        # Its log lines say which of the bot processes wrote them.
        multiprocessing.current_process().name = f"bot-{settings.bot_process_index}"
        run(settings)
        return 0
    with ExitStack() as stack:
        # The first bot process starts the others; they stop with it, and it with them.
        others = [
            stack.enter_context(
                _child(
                    f"bot process {index}",
                    ["bot"],
                    BOT_STOP_TIMEOUT_S,
                    CHITRAKAR_BOT_PROCESS_INDEX=str(index),
                )
            )
            for index in range(1, settings.bot_processes)
        ]
        run(settings)
    return 1 if any(failed.is_set() for failed in others) else 0


def cmd_beat(settings: Settings, _: argparse.Namespace) -> int:
    """The scheduler of periodic tasks (the retention sweep): one per deployment."""
    _require_current_schema(settings)
    from workers.celery_app import app

    app.start(["beat", f"--loglevel={settings.log_level.upper()}"])
    return 0


def cmd_retention_sweep(settings: Settings, _: argparse.Namespace) -> int:
    """Delete what the retention rules say is due, now."""
    _require_current_schema(settings)
    from datetime import UTC, datetime

    from chitrakar.artifacts import artifact_store_from_url
    from chitrakar.media import MediaStore
    from chitrakar.retention import sweep
    from db.session import Store

    store = Store(settings.resolved_database_url)
    try:
        report = sweep(
            settings,
            store,
            artifact_store_from_url(settings.artifact_store, settings.resolved_data_dir),
            MediaStore(settings.media_dir),
            datetime.now(UTC),
        )
    finally:
        store.dispose()
    print(
        f"deleted the results of {report.results} job(s), {report.inputs} selfie crop(s), "
        f"the files of {report.orphans} job(s) that no longer exist and "
        f"{report.web_messages} web chat message(s)"
    )
    return 0


def celery_worker(app: Celery, settings: Settings, *, beat: bool) -> CeleryWorker:
    """Celery's worker program, built here rather than by `app.worker_main`, which drops its
    exit code: 1 after an unrecoverable error, so that a service manager restarts it and
    `chitrakar run` does not go on without it."""
    from celery.utils.nodenames import host_format

    from workers.celery_app import PromptTimer

    return app.Worker(
        hostname=host_format(f"chitrakar-{os.getpid()}@%h"),
        pool_cls="solo",  # one process per GPU; CUDA does not survive a fork
        concurrency=1,
        # Woken every 0.1 s, so a stop does not wait for it (with the embedded broker).
        timer_cls=PromptTimer,
        without_gossip=True,
        without_mingle=True,
        loglevel=settings.log_level.upper(),
        # `chitrakar run`: this worker also runs the periodic tasks (no separate beat).
        beat=beat,
    )


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    _require_valid_catalogue(settings)
    _require_current_schema(settings)
    from chitrakar.presets import PresetError
    from chitrakar.process import freeze_start_up_objects
    from chitrakar.queue import publish_generate
    from workers.celery_app import app
    from workers.pipelines import DeviceUnavailable, ModelNotFound
    from workers.service import requeue_unfinished
    from workers.tasks import runtime

    # Load (and compile) the model and connect to the chat before the first job, so no user
    # waits for it.
    try:
        runtime().warm_up()
    except (ModelNotFound, PresetError, DeviceUnavailable) as exc:
        raise SystemExit(f"The worker cannot start: {exc}") from None
    runtime().delivery.connect_all()
    runtime().start_heartbeat()
    # torch, diffusers and the models: 534,207 tracked objects with the tiny model.
    freeze_start_up_objects()
    if settings.worker_health_port is not None:
        from workers.health import serve_health

        def broker_ping() -> None:
            with app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=5)

        serve_health(
            settings.web_host,
            settings.worker_health_port,
            lambda: runtime().beating,
            lambda: runtime().check_ready(broker_ping),
        )
    if args.requeue_unfinished:
        requeue_unfinished(runtime(), lambda job_id: publish_generate(app, job_id))
    worker = celery_worker(app, settings, beat=args.beat)
    try:
        worker.start()
    finally:
        # A clean stop: the heartbeat goes, and with it any claim on a job.
        runtime().close()
    return int(worker.exitcode or 0)


def cmd_run(settings: Settings, _: argparse.Namespace) -> int:
    """Store, worker and bot on one machine: the database is upgraded, a worker runs as a
    child process (taking up what a previous run left unfinished), and the bot (the web chat,
    and Telegram when a token is set) runs in this one until stopped."""
    _require_a_chat(settings)
    _require_valid_catalogue(settings)
    cmd_db_upgrade(settings, _)
    if settings.web_chat:
        _greet_the_owner(settings)
    # Without its worker the bot would accept jobs that never run: it stops too. The worker
    # finishes the job in hand first; what it cannot finish in time the next run re-queues.
    with _child(
        "worker", ["worker", "--requeue-unfinished", "--beat"], WORKER_STOP_TIMEOUT_S
    ) as worker_failed:
        result = cmd_bot(settings, _)
    return 1 if worker_failed.is_set() else result


@contextmanager
def _child(name: str, arguments: list[str], stop_timeout: float, **env: str) -> Iterator[Event]:
    """A `chitrakar` child process for the length of the block (with `env` added to this
    one's environment). It has its own session, so Ctrl-C in the terminal reaches this
    process alone, which then stops the child gracefully (SIGTERM, then SIGKILL after
    `stop_timeout` s); it gets SIGTERM if this process dies (Linux). If the child stops on
    its own, this process is stopped too (SIGTERM), and the Event yielded is set unless
    the child's stop was a clean one (exit code 0, or SIGTERM or SIGINT)."""
    child = subprocess.Popen(
        # -P: the current folder is not searched for modules (a stray celery.py there).
        [sys.executable, "-P", "-m", "chitrakar", *arguments],
        env={**os.environ, **env} if env else None,
        start_new_session=True,
        # Also when `run` died between the fork and the call.
        preexec_fn=functools.partial(die_with_parent, parent=os.getpid()),
    )
    log.info("%s started (pid %s)", name, child.pid)
    stopping, failed = Event(), Event()

    def watch() -> None:
        code = child.wait()
        if stopping.is_set():
            return
        # Whatever the reason, the bot must not go on taking requests nothing will make. A
        # stop that was asked for (a service manager signals every process at once) is not
        # a failure.
        if code in (0, -signal.SIGTERM, -signal.SIGINT):
            log.info("the %s stopped; stopping the bot", name)
        else:
            failed.set()
            log.error("the %s stopped (exit code %s); stopping the bot", name, code)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name=f"{name} watch", daemon=True).start()
    try:
        yield failed
    finally:
        stopping.set()
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            _wait_or_kill(child, name, stop_timeout)


def _wait_or_kill(child: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    """Wait for a child told to stop (a worker finishes its job first); kill it after
    `timeout` s, or at the second Ctrl-C after saying so at the first: `run` never ends
    before its child, which a quick restart would otherwise find still running."""
    deadline = time.monotonic() + timeout
    warned = False
    while True:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0))
            return
        except subprocess.TimeoutExpired:
            break
        except KeyboardInterrupt:
            if warned:
                break
            warned = True
            print(f"\nStopping the {name}; Ctrl-C again to kill it.", file=sys.stderr, flush=True)
    child.kill()
    child.wait()


def _greet_the_owner(settings: Settings) -> None:
    """On the terminal: where the web chat is, and, until the machine's owner (an admin) has
    signed in, a one-time sign-in link for them, as a notebook server prints its token."""
    if _owner_signed_in(settings):
        sign_in = f"Sign in on another device: chitrakar users invite {OWNER_ACCOUNT} --admin"
    else:
        link = _invite(settings, OWNER_ACCOUNT, admin=True)
        sign_in = f"Sign in as {OWNER_ACCOUNT} (once, within {settings.web_link_hours:g} h): {link}"
    model = (
        "the tiny demo model (its images are noise)" if settings.uses_demo_model else settings.model
    )
    print(
        f"\nChitrakar's web chat: {settings.public_web_url}\n"
        f"{sign_in}\n"
        f"Invite others with: chitrakar users invite NAME\n"
        f"Model: {model}\n"
        + (
            "Telegram: on\n"
            if settings.telegram_token
            else "Telegram: off (no CHITRAKAR_TELEGRAM_TOKEN)\n"
        ),
        flush=True,
    )


def _in_store(settings: Settings, work: Callable[[UnitOfWork], T]) -> T:
    """Run `work` in one unit of work on the deployment's database, for a command."""
    from db.session import Store

    store = Store(settings.resolved_database_url)
    try:
        with store.unit_of_work() as uow:
            return work(uow)
    finally:
        store.dispose()


def _owner_signed_in(settings: Settings) -> bool:
    from db import web

    def signed_in(uow: UnitOfWork) -> bool:
        owner = next((a for a in web.accounts(uow) if a.name == OWNER_ACCOUNT), None)
        return owner is not None and web.signed_in_somewhere(uow, owner.id)

    return _in_store(settings, signed_in)


def _invite(settings: Settings, name: str, admin: bool) -> str:
    from datetime import timedelta

    from db import web

    def invite(uow: UnitOfWork) -> str:
        account = web.ensure_account(uow, name, is_admin=admin)
        return web.issue_sign_in_link(uow, account.id, timedelta(hours=settings.web_link_hours))

    return f"{settings.public_web_url}/signin/{_in_store(settings, invite)}"


def cmd_users_invite(settings: Settings, args: argparse.Namespace) -> int:
    """A one-time sign-in link to the web chat for NAME (the account is made if new)."""
    _require_current_schema(settings)
    name = args.name.strip().lower()
    if not USER_NAME.fullmatch(name):
        print(
            "a name is 1-64 letters, digits, dots, dashes or underscores (an e-mail address works)",
            file=sys.stderr,
        )
        return 2
    link = _invite(settings, name, admin=args.admin)
    role = "an admin" if args.admin else "a user"
    print(f"Sign-in link for {name} ({role}), valid once within {settings.web_link_hours:g} h:")
    print(link)
    return 0


def cmd_users_revoke(settings: Settings, args: argparse.Namespace) -> int:
    """Sign NAME out of the web chat everywhere and void their unused links."""
    _require_current_schema(settings)
    from db import web

    revoked = _in_store(settings, lambda uow: web.revoke(uow, args.name))
    if revoked is None:
        print(f"there is no web chat account named {args.name}", file=sys.stderr)
        return 1
    print(f"{revoked.name} is signed out everywhere; a new link lets them in again")
    return 0


def cmd_users_list(settings: Settings, _: argparse.Namespace) -> int:
    _require_current_schema(settings)
    from db import web

    found = _in_store(settings, web.accounts)
    for account in found:
        print(f"{account.id:6} {account.name}{'  (admin)' if account.is_admin else ''}")
    print(f"{len(found)} web chat account(s)")
    return 0


def cmd_make_tiny(settings: Settings, args: argparse.Namespace) -> int:
    from workers.tiny import CannotWriteModel, make_tiny

    try:
        path = make_tiny(Path(args.path), seed=args.seed)
    except CannotWriteModel as exc:
        raise SystemExit(str(exc)) from None
    print(f"tiny Stable Diffusion pipeline written to {path}")
    return 0


def cmd_make_tiny_lora(settings: Settings, args: argparse.Namespace) -> int:
    from workers.tiny import make_tiny_lora

    path = make_tiny_lora(Path(args.model), Path(args.path), seed=args.seed)
    print(f"random LoRA written to {path}")
    return 0


def cmd_make_random(settings: Settings, args: argparse.Namespace) -> int:
    import torch

    from workers.random_models import make_random
    from workers.tiny import CannotWriteModel

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    try:
        path = make_random(args.arch, Path(args.path), dtype[args.dtype], seed=args.seed)
    except CannotWriteModel as exc:
        raise SystemExit(str(exc)) from None
    print(f"random {args.arch} pipeline at full size written to {path} (its images are noise)")
    return 0


def cmd_presets(settings: Settings, _: argparse.Namespace) -> int:
    """The presets, and whether this machine's device can run each (and why not)."""
    from chitrakar.presets import PresetError, load_presets, unmet_needs
    from workers.acceleration import device_facts
    from workers.pipelines import resolve_device

    try:
        catalogue = load_presets(settings.presets_file)
        device = resolve_device(settings.device)
        chosen = catalogue.choose(settings.preset, settings.model, device.type).name
    except (PresetError, RuntimeError) as exc:
        raise SystemExit(str(exc)) from None
    facts = device_facts(device)
    chosen_runs = not unmet_needs(catalogue.presets[chosen], facts)
    verdict = "the worker would use" if chosen_runs else "the worker would refuse to start with"
    print(f"Presets on this machine ({device}); {verdict}: {chosen}\n")
    width = max(map(len, catalogue.presets))
    for name, preset in sorted(catalogue.presets.items()):
        reasons = unmet_needs(preset, facts)
        mark = "  " if not reasons else "✗ "
        print(f"{mark}{name:<{width}} {preset.description}")
        for reason in reasons:
            print(f"{'':{width + 2}} cannot run here: {reason}")
    return 0 if chosen_runs else 1


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _image_side(text: str) -> int:
    if not text.isdigit() or int(text) < 64 or int(text) % 8:
        raise argparse.ArgumentTypeError(f"{text!r}: a side is a multiple of 8 from 64 up")
    return int(text)


def _capability(text: str) -> tuple[int, int]:
    from chitrakar.capacity import parse_capability

    try:
        return parse_capability(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,2,4,8") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes are whole numbers of at least 1")
    return sizes


def _cannot_write(path: Path) -> str | None:
    """Why a file could not be written (or appended to) at `path`, or None."""
    if path.is_dir():
        return f"{path} is a folder, not a file"
    if not path.parent.is_dir():
        return f"cannot write {path}: {path.parent} is not a folder"
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        return f"cannot write {path}: permission denied"
    return None


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from chitrakar.capacity import BUILTIN_MEASUREMENTS, load_measurements, preset_name_problem
    from chitrakar.presets import PresetError, load_presets
    from workers.benchmark import BatchFigures, BenchReport, format_report, record, run_bench
    from workers.pipelines import ModelNotFound, load_configured, resolve_device
    from workers.tiny import made_arch

    source = args.model or settings.model
    if source is None:
        raise SystemExit("cannot benchmark: give --model (a diffusers folder or hub id)")
    table = Path(args.table) if args.table else BUILTIN_MEASUREMENTS
    outputs = [args.json] + ([args.record, table] if args.record else [])
    # Found now rather than after loading, compiling and the first timed batch.
    for output in filter(None, outputs):
        if (problem := _cannot_write(Path(output))) is not None:
            raise SystemExit(f"cannot benchmark: {problem}")
    # No store, broker or chat: only the model, loaded as the worker loads it.
    settings = settings.model_copy(
        update={"model": source, "preset": args.preset or settings.preset}
    )
    try:
        device = resolve_device(settings.device)
        if args.record:
            # A name the measured table refuses, found before the model loads rather than
            # after the first batch size is timed.
            chosen = load_presets(settings.presets_file).choose(
                settings.preset, settings.model, device.type
            )
            if (problem := preset_name_problem(chosen.name)) is not None:
                raise SystemExit(f"cannot benchmark: {problem}")
        loaded = load_configured(settings, source, device)
    except (ModelNotFound, PresetError, RuntimeError) as exc:
        raise SystemExit(f"cannot benchmark: {exc}") from None
    label = args.label or (made_arch(Path(source)) if Path(source).is_dir() else None) or source

    def keep(report: BenchReport, figures: BatchFigures) -> None:
        # Each batch size as it is done: a run stopped part way keeps what it measured.
        try:
            if args.json:
                Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
            if args.record:
                record(replace(report, batches=[figures]), Path(args.record), table)
                load_measurements(table)  # what was appended reads back
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot record the results: {exc}") from None

    report = run_bench(
        loaded,
        model=label,
        width=args.size,
        height=args.size,
        steps=args.steps,
        batches=args.batches,
        runs=args.runs,
        on_batch=keep,
    )
    print(format_report(report), file=sys.stderr)
    if not args.json:
        print(json.dumps(report.to_json(), indent=2))
    if args.record:
        print(f"recorded in {args.record} and {table}", file=sys.stderr)
    return 0


def _measurements(args: argparse.Namespace) -> list[Measurement]:
    """The measured table named by --table, or the packaged one; a clear exit if unreadable."""
    from chitrakar.capacity import load_measurements

    try:
        return load_measurements(Path(args.table) if args.table else None)
    except (ValueError, OSError) as exc:
        raise SystemExit(str(exc)) from None


def cmd_plan(settings: Settings, args: argparse.Namespace) -> int:
    from chitrakar.capacity import format_plan, parse_memory, plan
    from chitrakar.presets import load_presets

    rows = _measurements(args)
    try:
        memory = parse_memory(args.gpu_mem)
        size = (args.size, args.size) if args.size else None
        # The presets (the operator's file included) only to check them against a capability.
        presets = load_presets(settings.presets_file).presets if args.capability else None
        report = plan(
            rows,
            args.model,
            memory,
            headroom_fraction=args.headroom,
            size=size,
            device=args.device,
            capability=args.capability,
            presets=presets,
        )
    except (ValueError, OSError) as exc:  # a PresetError is a ValueError
        raise SystemExit(str(exc)) from None
    print(format_plan(report))
    # A script can ask "does anything fit?" of the exit status.
    return 0 if report.fitting else 1


def cmd_tco(settings: Settings, args: argparse.Namespace) -> int:
    from chitrakar.capacity import measured_throughput
    from chitrakar.tco import CostInputs, cost_report, format_report, plot_tco

    if args.plot is not None and Path(args.plot).suffix.lower() != ".png":
        raise SystemExit(f"--plot writes a PNG: give a path ending in .png, not {args.plot!r}")
    throughput = args.images_per_second
    measurement_options = [
        f"--{name}"
        for name in ("model", "preset", "device", "size", "batch", "table")
        if vars(args)[name]
    ]
    if throughput is not None and measurement_options:
        raise SystemExit(
            f"give --images-per-second or a measurement ({', '.join(measurement_options)}), "
            "not both"
        )
    if throughput is None:
        if not (args.model and args.preset):
            raise SystemExit(
                "give --images-per-second, or --model and --preset to use a measurement"
            )
        size = (args.size, args.size) if args.size else None
        batch = args.batch or 1
        try:
            best = measured_throughput(
                _measurements(args), args.model, args.preset, args.device, size, batch
            )
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        throughput = best.images_per_second
        print(
            f"throughput: {throughput:.3f} images/s, {best.model} {best.preset} at batch "
            f"{best.batch}, {best.width}×{best.height}, {best.steps} steps on {best.device} "
            f"({best.source.split(':', 1)[0]})"
            + ("" if args.batch else "; batch 1 as a lone job runs (--batch N for another)")
        )
    try:
        inputs = CostInputs(
            images_per_second=throughput,
            power_watts=args.power_watts,
            idle_watts=args.idle_watts,
            electricity_price_per_kwh=args.electricity_price,
            utilisation=args.utilisation,
            hardware_price=args.hardware_price,
            amortisation_months=args.amortisation_months,
            hourly_rent=args.hourly_rent,
            other_monthly=args.other_monthly,
            api_price_per_image=args.api_price,
            currency=args.currency,
        )
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    try:
        report = cost_report(inputs)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(format_report(report))
    if args.plot is not None:
        try:
            print(f"plot written to {plot_tco(inputs, Path(args.plot))}")
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot write the plot: {exc}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chitrakar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run store, worker and bot on this machine").set_defaults(
        func=cmd_run
    )
    sub.add_parser(
        "bot", help="run the chat front end: the web chat, and Telegram when a token is set"
    ).set_defaults(func=cmd_bot)
    users = sub.add_parser("users", help="web chat accounts").add_subparsers(
        dest="users", required=True
    )
    invite = users.add_parser("invite", help="print a one-time sign-in link for NAME")
    invite.add_argument("name")
    invite.add_argument("--admin", action="store_true", help="the account may use admin commands")
    invite.set_defaults(func=cmd_users_invite)
    users.add_parser("list", help="list the web chat accounts").set_defaults(func=cmd_users_list)
    revoke = users.add_parser("revoke", help="sign NAME out everywhere (a lost phone)")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_users_revoke)
    worker = sub.add_parser("worker", help="run a generation worker")
    worker.add_argument(
        "--requeue-unfinished",
        action="store_true",
        help="first re-queue every job left queued or running; only for a sole worker "
        "(chitrakar run uses it)",
    )
    worker.add_argument(
        "--beat",
        action="store_true",
        help="also run the periodic tasks (the retention sweep); for a sole worker. With "
        "several, run `chitrakar beat` once instead",
    )
    worker.set_defaults(func=cmd_worker)
    sub.add_parser(
        "beat", help="run the periodic tasks' scheduler (once per deployment)"
    ).set_defaults(func=cmd_beat)
    retention = sub.add_parser("retention", help="data retention").add_subparsers(
        dest="retention", required=True
    )
    retention.add_parser(
        "sweep", help="delete the results, selfie crops and orphaned files that are due"
    ).set_defaults(func=cmd_retention_sweep)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    db.add_parser("upgrade", help="migrate the database to the newest schema").set_defaults(
        func=cmd_db_upgrade
    )

    model = sub.add_parser("model", help="models").add_subparsers(dest="model", required=True)
    tiny = model.add_parser("make-tiny", help="write a tiny random Stable Diffusion pipeline")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny)
    lora = model.add_parser(
        "make-tiny-lora", help="write a random LoRA for a pipeline folder (to try LoRA styles)"
    )
    lora.add_argument("model")
    lora.add_argument("path")
    lora.add_argument("--seed", type=int, default=0)
    lora.set_defaults(func=cmd_make_tiny_lora)

    make_random = model.add_parser(
        "make-random",
        help="write a randomly initialised pipeline at a real architecture's full size "
        "(to measure speed and memory without downloadable weights)",
    )
    make_random.add_argument("--arch", choices=["sd15", "sdxl"], required=True)
    make_random.add_argument("path")
    make_random.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], default="float16"
    )
    make_random.add_argument("--seed", type=int, default=0)
    make_random.set_defaults(func=cmd_make_random)

    sub.add_parser(
        "presets", help="list the pipeline presets and which this machine can run"
    ).set_defaults(func=cmd_presets)

    bench = sub.add_parser(
        "bench", help="latency and images per second at several batch sizes, and peak VRAM"
    )
    bench.add_argument("--model", help="a diffusers folder or hub id (default: CHITRAKAR_MODEL)")
    bench.add_argument("--preset", help="a preset name (default: CHITRAKAR_PRESET or auto)")
    bench.add_argument("--label", help="the model's name in the tables (default: from the model)")
    bench.add_argument("--size", type=_image_side, default=1024, help="image side in pixels")
    bench.add_argument("--steps", type=_at_least_one, default=30)
    bench.add_argument("--batches", type=_batch_sizes, default=[1, 2, 4, 8])
    bench.add_argument("--runs", type=_at_least_one, default=5, help="timed calls per batch size")
    bench.add_argument("--json", help="write the JSON report here (default: standard output)")
    bench.add_argument(
        "--record",
        metavar="BENCHMARKS_MD",
        help="append a row per batch size to this file, and to --table",
    )
    bench.add_argument(
        "--table",
        help="the measured table --record appends to (default: the packaged "
        "chitrakar/measurements.jsonl, which plan and tco read)",
    )
    bench.set_defaults(func=cmd_bench)

    plan = sub.add_parser("plan", help="which presets fit a GPU's memory, from measured tables")
    plan.add_argument("--gpu-mem", required=True, help="the GPU's memory, e.g. 8GiB or 24GB")
    plan.add_argument("--model", required=True, help="e.g. sdxl, sd15")
    plan.add_argument(
        "--headroom", type=float, default=0.1, help="share kept free (CUDA context, fragments)"
    )
    plan.add_argument(
        "--size",
        type=_image_side,
        help="image side in pixels (default: the size the model was measured at most)",
    )
    plan.add_argument(
        "--device", help="only measurements on a device whose name has this, e.g. H100"
    )
    plan.add_argument(
        "--capability",
        type=_capability,
        help="the GPU's CUDA compute capability, e.g. 7.5 (Turing), 8.6, 8.9, 9.0: presets it "
        "cannot run are marked, and 'auto' ones judged in float16 below 8.0 "
        "(default: not checked)",
    )
    plan.add_argument("--table", help="a measured table (default: the packaged one)")
    plan.set_defaults(func=cmd_plan)

    tco = sub.add_parser("tco", help="cost per 1,000 images, self-hosted against an API")
    throughput = tco.add_argument_group("throughput (one of)")
    throughput.add_argument("--images-per-second", type=float)
    throughput.add_argument("--model", help="with --preset: the measured throughput")
    throughput.add_argument("--preset")
    throughput.add_argument(
        "--batch",
        type=_at_least_one,
        help="the measurement at this batch size (default: 1, as a lone job runs; a larger "
        "batch only when the GPU is busy enough to fill it)",
    )
    throughput.add_argument("--device", help="only measurements on a device whose name has this")
    throughput.add_argument(
        "--size", type=_image_side, help="only measurements at this image side in pixels"
    )
    throughput.add_argument("--table", help="a measured table (default: the packaged one)")
    hardware = tco.add_argument_group("hardware (owned or rented)")
    hardware.add_argument("--hardware-price", type=float)
    hardware.add_argument("--amortisation-months", type=float)
    hardware.add_argument("--hourly-rent", type=float)
    running = tco.add_argument_group("running")
    running.add_argument("--power-watts", type=float, required=True, help="the server at load")
    running.add_argument("--idle-watts", type=float, default=0.0)
    running.add_argument("--electricity-price", type=float, required=True, help="per kWh")
    running.add_argument("--utilisation", type=float, required=True, help="0 < u ≤ 1")
    running.add_argument("--other-monthly", type=float, default=0.0, help="hosting, staff")
    tco.add_argument("--api-price", type=float, help="a cloud API's price per image")
    tco.add_argument("--currency", default="USD")
    tco.add_argument("--plot", help="also draw cost against utilisation to this PNG")
    tco.set_defaults(func=cmd_tco)

    styles = sub.add_parser("styles", help="the style catalogue").add_subparsers(
        dest="styles", required=True
    )
    styles.add_parser(
        "check", help="validate the catalogue and CHITRAKAR_STYLES_FILE; list the styles"
    ).set_defaults(func=cmd_styles_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    # python-telegram-bot's coming default: durations (such as a 429's retry_after) as timedelta.
    os.environ.setdefault("PTB_TIMEDELTA", "true")
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"chitrakar: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    from sqlalchemy import make_url
    from sqlalchemy.exc import InterfaceError, OperationalError

    try:
        result: int = args.func(settings, args)
    except (OperationalError, InterfaceError) as exc:
        # At start, a database out of reach (not up yet, a wrong host or password): one line.
        database = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        print(f"chitrakar: cannot use the database at {database}: {reason}", file=sys.stderr)
        return 1
    return result
