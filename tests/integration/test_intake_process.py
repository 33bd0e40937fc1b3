"""The bot's intake in a process of its own (CHITRAKAR_BOT_INTAKE_PROCESS): the calls every
command makes run in a spawned child with its own database engine and broker connection;
each request hears its own outcome, refusals included; a child that dies is replaced; and no
child outlives its bot, stopped or killed."""

from __future__ import annotations

import asyncio
import os
import pickle
import pickletools
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from telegram import Bot, Update

from bot.coalescing import Coalesced
from bot.context import origin_of, taken_in
from bot.intake_process import (
    PARENT_CHECK_S,
    IntakeFailed,
    IntakeProcess,
    IntakeProcessStopped,
    _sendable,
)
from chitrakar.config import Settings
from chitrakar.domain import Command, ImageRequest, JobStatus, parse_image_command
from chitrakar.quota import QuotaExceeded
from chitrakar.safety import PromptBlocked
from chitrakar.services import Accepted
from db import jobs
from db.jobs import Origin
from db.migrate import upgrade_to_head
from db.session import Store
from tests.support.stack import process_running, wait_until_gone

ROOT = Path(__file__).resolve().parents[2]


def origin(user: int, message_id: int = 1) -> Origin:
    return Origin("telegram", user, "private", str(user), f"user {user}", "en", message_id)


def portrait(words: str = "a lighthouse at dawn") -> ImageRequest:
    return parse_image_command(Command.PORTRAIT, words)


class NeedsTwo(Exception):
    """Pickled with one argument, as exceptions are: it cannot be unpickled."""

    def __init__(self, one: str, two: str) -> None:
        super().__init__(f"{one} {two}")


def settings_on(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        broker_url=redis_url,
        data_dir=tmp_path,
        image_size=64,
        default_steps=4,
        daily_quota=2,
        max_jobs_in_flight=1,
    )


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    """On SQLite: the tests of the process itself, not of the database."""
    database_url = f"sqlite:///{tmp_path / 'test.db'}"
    upgrade_to_head(database_url)
    return settings_on(database_url, redis_url, tmp_path)


@pytest.fixture
def intake_process(settings: Settings) -> Iterator[IntakeProcess]:
    intake = IntakeProcess(settings)
    yield intake
    intake.shutdown()


@pytest.fixture
def intake_on_each_database(
    store: Store, database_url: str, redis_url: str, tmp_path: Path
) -> Iterator[IntakeProcess]:
    """On SQLite and on PostgreSQL (`store` migrated it)."""
    intake = IntakeProcess(settings_on(database_url, redis_url, tmp_path))
    yield intake
    intake.shutdown()


async def test_commands_taken_in_by_the_intake_process_each_hear_their_own_outcome(
    intake_on_each_database: IntakeProcess, store: Store
) -> None:
    intake_process = intake_on_each_database
    child = intake_process.warm_up()
    assert child != os.getpid() and process_running(child)

    def call(name: str) -> Coalesced[object, object]:
        return Coalesced(IntakeProcess.call(name), executor=intake_process)

    assert await asyncio.gather(*(call("is_banned")(user) for user in ("1", "2"))) == [
        False,
        False,
    ]
    accept = call("accept")
    outcomes = await asyncio.gather(
        accept((origin(1), portrait())),
        accept((origin(2), portrait("a nude woman on a beach"))),  # refused by the lists
        accept((origin(3, 1), portrait())),
        accept((origin(3, 2), portrait())),  # held: one job in flight a user
        accept((origin(3, 3), portrait())),  # two credits a day
        return_exceptions=True,
    )
    first, blocked, third, held, short = outcomes
    assert isinstance(first, Accepted) and first.handed_over
    assert isinstance(third, Accepted) and third.handed_over
    assert isinstance(held, Accepted) and not held.handed_over
    # Refusals cross to the bot whole: their class, text key and parameters.
    assert isinstance(blocked, PromptBlocked) and blocked.verdict is not None
    assert isinstance(short, QuotaExceeded)
    assert short.key == "quota.exceeded" and (short.params["cost"], short.params["left"]) == (1, 0)

    dispatch, attach = call("dispatch"), call("attach_status_message")
    assert await asyncio.gather(dispatch(first), dispatch(third), dispatch(held)) == [True] * 3
    assert await attach((first.job_id, 11)) is True
    with store.unit_of_work() as uow:
        job = jobs.get_job(uow, first.job_id)
        assert job.status == JobStatus.QUEUED and job.status_message_id == 11
        assert jobs.get_job(uow, held.job_id).status == JobStatus.QUEUED
    assert intake_process.warm_up() == child  # one process did all of it


def test_a_killed_intake_process_is_replaced_by_the_next_call(
    intake_process: IntakeProcess,
) -> None:
    first = intake_process.warm_up()
    os.kill(first, signal.SIGKILL)
    wait_until_gone(first, timeout=10)
    # A call made before the bot saw the death fails (its commands' users are told);
    # the next one starts another process.
    answers: list[int | BaseException] = []
    for _ in range(3):
        try:
            answers.append(intake_process.warm_up())
            break
        except IntakeProcessStopped as exc:
            answers.append(exc)
            time.sleep(0.2)
    second = answers[-1]
    assert isinstance(second, int) and second != first and process_running(second), answers
    assert len(answers) <= 2, answers


async def test_a_request_whose_intake_process_died_with_it_in_hand_is_asked_again(
    intake_process: IntakeProcess, settings: Settings
) -> None:
    """The child wrote the job and died before answering (here the job is written first, and
    the child killed with the call in hand): the bot asks again, in the next child, and
    answers and hands over the job that was written, rather than telling its user that it
    failed while the reconciler runs it ten minutes later."""
    from bot.bootstrap import bootstrap

    services = bootstrap(settings)
    try:
        written = services.intake.accept(origin(5), portrait())  # ... the answer was lost
    finally:
        services.close()
    child = intake_process.warm_up()
    intake_process.submit(time.sleep, 30)  # the call waits in the child's hands
    accept = Coalesced(IntakeProcess.call("accept"), executor=intake_process)
    accept_again = Coalesced(IntakeProcess.call("accept_again"), executor=intake_process)
    asking = asyncio.create_task(
        taken_in(lambda again: (accept_again if again else accept)((origin(5), portrait())))
    )
    await asyncio.sleep(0.5)  # handed to the child: the event loop's turns, no thread
    assert not asking.done()
    os.kill(child, signal.SIGKILL)
    accepted = await asyncio.wait_for(asking, timeout=60)
    assert (accepted.job_id, accepted.duplicate, accepted.handed_over) == (
        written.job_id,
        False,
        True,
    )
    assert intake_process.warm_up() not in (child, os.getpid())


def test_the_intake_process_runs_first_the_calls_an_acknowledgement_waits_for(
    intake_process: IntakeProcess,
) -> None:
    """A user's status message waits for their ban check, then for their intake; recording
    a status message already sent waits for nobody. Queued together, they run in that
    order, not in the order asked."""
    intake_process.warm_up()
    busy = intake_process.submit(time.sleep, 0.5)  # the next three queue behind it
    record = intake_process.submit(IntakeProcess.call("attach_status_message"), [(999, 1)])
    take_in = intake_process.submit(IntakeProcess.call("accept"), [(origin(7), portrait())])
    ban_check = intake_process.submit(IntakeProcess.call("is_banned"), ["7"])
    finished: list[str] = []
    for name, future in (("record", record), ("take in", take_in), ("ban check", ban_check)):
        future.add_done_callback(lambda _, name=name: finished.append(name))
    busy.result(timeout=30)
    assert record.result(timeout=30) == [False]  # no job 999
    assert ban_check.result(timeout=30) == [False]
    accepted = take_in.result(timeout=30)[0]
    assert isinstance(accepted, Accepted) and accepted.position == 1
    assert finished == ["ban check", "take in", "record"]


def test_the_intake_process_stops_with_its_bot(intake_process: IntakeProcess) -> None:
    child = intake_process.warm_up()
    intake_process.shutdown()
    wait_until_gone(child, timeout=10)
    assert not process_running(child)


def test_the_intake_process_stops_when_its_bot_is_killed(settings: Settings) -> None:
    """A bot killed outright (SIGKILL, the OOM killer) never stops its child; the child
    sees its parent gone and stops itself."""
    script = (
        "import os, sys\n"
        "from bot.intake_process import IntakeProcess\n"
        "from chitrakar.config import Settings\n"
        "intake = IntakeProcess(Settings.model_validate_json(sys.stdin.read()))\n"
        "print(intake.warm_up(), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    bot = subprocess.run(
        [sys.executable, "-c", script],
        input=settings.model_dump_json(),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert bot.returncode == -signal.SIGKILL, bot.stderr
    child = int(bot.stdout.strip())
    wait_until_gone(child, timeout=PARENT_CHECK_S * 5)


def test_an_exception_that_cannot_cross_to_the_bot_is_told_as_intake_failed() -> None:
    crossing = ValueError("fine")
    assert _sendable(crossing) is crossing
    told = _sendable(NeedsTwo("a", "b"))
    assert isinstance(told, IntakeFailed) and str(told) == "NeedsTwo: a b"
    exiting = _sendable(SystemExit(3))
    assert isinstance(exiting, IntakeFailed) and str(exiting) == "SystemExit: 3"


def test_a_call_that_exits_fails_alone(intake_process: IntakeProcess) -> None:
    """A call raising SystemExit (not an Exception) is told as a failure, and the child
    goes on answering the calls after it."""
    child = intake_process.warm_up()
    with pytest.raises(IntakeFailed, match="SystemExit: 3"):
        intake_process.submit(sys.exit, 3).result(timeout=30)
    assert intake_process.submit(os.getpid).result(timeout=30) == child


def test_what_a_command_sends_to_the_intake_process_names_nothing_of_telegram() -> None:
    """An Origin made from a Telegram update crosses as plain values: one carrying
    python-telegram-bot's ChatType made the child import python-telegram-bot on the first
    command, which then waited 0.19 s instead of 0.03 s."""
    update = Update.de_json(
        {
            "update_id": 1,
            "message": {
                "message_id": 7,
                "date": 0,
                "chat": {"id": -100, "type": "supergroup", "title": "Kochi"},
                "from": {"id": 5, "is_bot": False, "first_name": "Asha"},
                "text": "/portrait a kite",
            },
        },
        Bot("1:x"),
    )
    origin = origin_of(update, "en")
    assert origin.chat_type == "supergroup"
    modules = {
        arg.split(".")[0]
        for op, arg, _ in pickletools.genops(pickle.dumps((origin, portrait())))
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE") and "." in str(arg)
    }
    assert "telegram" not in modules and "db" in modules  # db.jobs' Origin itself
