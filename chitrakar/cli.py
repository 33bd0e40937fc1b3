"""The `chitrakar` command. Each sub-command reads the settings once and starts one part;
the bot and worker modules are imported only by the sub-command that runs them."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from chitrakar.config import Settings, load_settings

if TYPE_CHECKING:
    from db.session import UnitOfWork

T = TypeVar("T")

log = logging.getLogger("chitrakar")

# The web chat account `chitrakar run` prints a sign-in link for.
OWNER_ACCOUNT = "owner"
USER_NAME = re.compile(r"[a-z0-9._@+-]{1,64}")
# How long `chitrakar run` lets its worker finish the job in hand when stopping.
WORKER_STOP_TIMEOUT_S = 300

TELEGRAM_SETUP_GUIDE = """\
CHITRAKAR_TELEGRAM_TOKEN is not set and the web chat is off (CHITRAKAR_WEB_CHAT=false), so
there is no chat to serve. Turn the web chat on, or connect a Telegram bot.

To connect a Telegram bot:
  1. In Telegram, open @BotFather, send /newbot and follow its questions.
  2. Copy the token it gives you (it looks like 123456789:AA...).
  3. Put it in a file named .env here:   CHITRAKAR_TELEGRAM_TOKEN=123456789:AA...
     (or export it in your shell), then run this command again.
"""


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO, which would log the bot token in each URL.
    logging.getLogger("httpx").setLevel(logging.WARNING)


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
    _require_current_schema(settings)
    from bot.server import run

    run(settings)
    return 0


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


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    _require_valid_catalogue(settings)
    _require_current_schema(settings)
    from chitrakar.presets import PresetError
    from chitrakar.queue import publish_generate
    from workers.celery_app import app
    from workers.pipelines import ModelNotFound
    from workers.service import requeue_unfinished
    from workers.tasks import runtime

    # Load (and compile) the model and connect to the chat before the first job, so no user
    # waits for it.
    try:
        runtime().warm_up()
    except (ModelNotFound, PresetError) as exc:
        raise SystemExit(f"The worker cannot start: {exc}") from None
    runtime().delivery.connect_all()
    runtime().start_heartbeat()
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
    try:
        app.worker_main(
            [
                "worker",
                "--pool=solo",  # one process per GPU; CUDA does not survive a fork
                "--concurrency=1",
                "--without-gossip",
                "--without-mingle",
                f"--loglevel={settings.log_level.upper()}",
                f"--hostname=chitrakar-{os.getpid()}@%h",
                # `chitrakar run`: this worker also runs the periodic tasks (no separate beat).
                *(["--beat"] if args.beat else []),
            ]
        )
    finally:
        # A clean stop: the heartbeat goes, and with it any claim on a job.
        runtime().close()
    return 0


def cmd_run(settings: Settings, _: argparse.Namespace) -> int:
    """Store, worker and bot on one machine: the database is upgraded, a worker runs as a
    child process (taking up what a previous run left unfinished), and the bot (the web chat,
    and Telegram when a token is set) runs in this one until stopped."""
    _require_a_chat(settings)
    _require_valid_catalogue(settings)
    cmd_db_upgrade(settings, _)
    if settings.web_chat:
        _greet_the_owner(settings)
    # Its own session: Ctrl-C in the terminal reaches the bot alone, which then stops the
    # worker gracefully (the job in hand is finished first).
    worker = subprocess.Popen(
        [sys.executable, "-m", "chitrakar", "worker", "--requeue-unfinished", "--beat"],
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    log.info("worker started (pid %s); starting the bot", worker.pid)
    stopping = threading.Event()
    worker_failed = threading.Event()

    def watch_worker() -> None:
        # Without its worker the bot would accept jobs that never run: stop it too.
        code = worker.wait()
        if not stopping.is_set() and code not in (0, -signal.SIGTERM, -signal.SIGINT):
            worker_failed.set()
            log.error("the worker stopped (exit code %s); stopping the bot", code)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_worker, name="worker-watch", daemon=True).start()
    try:
        result = cmd_bot(settings, _)
    finally:
        stopping.set()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                # What it could not finish is re-queued by the next run.
                worker.kill()
                worker.wait()
    return 1 if worker_failed.is_set() else result


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


def _die_with_parent() -> None:
    """In the worker child: get SIGTERM if `chitrakar run` itself dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def cmd_make_tiny(settings: Settings, args: argparse.Namespace) -> int:
    from workers.tiny import make_tiny

    path = make_tiny(Path(args.path), seed=args.seed)
    print(f"tiny Stable Diffusion pipeline written to {path}")
    return 0


def cmd_make_tiny_lora(settings: Settings, args: argparse.Namespace) -> int:
    from workers.tiny import make_tiny_lora

    path = make_tiny_lora(Path(args.model), Path(args.path), seed=args.seed)
    print(f"random LoRA written to {path}")
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
    settings = load_settings()
    _configure_logging(settings)
    result: int = args.func(settings, args)
    return result
