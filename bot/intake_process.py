"""The commands' intake in a process of its own (CHITRAKAR_BOT_INTAKE_PROCESS), so that a busy
bot uses a second core.

Under load one bot process is bound to one core: its event loop (python-telegram-bot polling,
parsing updates and sending status messages) and the intake's database and broker work share
one GIL, about half of the CPU each (BENCHMARKS.md). With this set, the calls every command
makes (the ban check, taking the request in and recording its status message; publishing
its job stays in the bot) run in one child process with its own database engine.
`bot.coalescing` already makes one call per batch of commands, so a batch crosses to the
child and back once.

The child runs the calls one at a time: first those a user's acknowledgement waits for (the
ban check, then taking requests in), each kind in the order asked; recording status messages,
which have been sent already, when nothing else waits. It is started with
`spawn` (forking a process whose event loop and threads are running is unsafe) and warmed up
before the bot takes updates. It ignores SIGINT and SIGTERM, which a terminal or a service
manager sends to the whole group: the bot finishes the commands in hand, then stops it. When
it dies, the calls in flight fail (their users are told; the database keeps what was
committed) and the next call starts another.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, ParamSpec, TypeVar

from bot.bootstrap import CHANNEL, BotServices, bootstrap
from chitrakar.config import Settings
from chitrakar.process import configure_logging, freeze_start_up_objects

log = logging.getLogger(__name__)

PROCESS_NAME = "bot-intake"
# How often the child checks that the bot is still there: a bot killed outright never
# stops it.
PARENT_CHECK_S = 1.0
# How long a stopping bot waits for the child to finish the calls in hand.
STOP_TIMEOUT_S = 30.0

P = ParamSpec("P")
T = TypeVar("T")

# The calls every command makes, by name: made in the bot's threads, or in the child's.
INTAKE_CALLS: dict[str, Callable[[BotServices, list[Any]], Sequence[Any]]] = {
    "is_banned": lambda services, user_ids: services.moderation.are_banned(CHANNEL, user_ids),
    "accept": lambda services, requests: services.intake.accept_many(requests),
    # Asked again after "accept" failed other than by refusing (bot.context.taken_in).
    "accept_again": lambda services, requests: services.intake.accept_many(
        requests, asked_before=True
    ),
    "dispatch": lambda services, accepted: services.intake.dispatch_many(accepted),
    "attach_status_message": lambda services, sent: services.intake.attach_status_messages(sent),
}

# The calls made in the child: the ban check and the writes. Publishing stays in the bot's
# threads: with it, the child (one call at a time) was the busier process of the two, and
# the acknowledgements' tail twice as long (BENCHMARKS.md).
IN_THE_INTAKE_PROCESS = frozenset({"is_banned", "accept", "accept_again", "attach_status_message"})

# Which of the calls waiting in the child it runs first (lowest first; the same kind in the
# order asked). A command's acknowledgement, its status message, waits for its ban check and
# then for its intake; recording the message, once sent, waits for nobody. In the order
# asked, each ban check queued behind the intakes and recordings of the batches before it,
# and that wait was most of an acknowledgement's (BENCHMARKS.md). (Publishing, made in the
# bot, has a rank for completeness: a job waits for it.)
CALL_RANKS = {
    "is_banned": 0,
    "accept": 1,
    "accept_again": 1,
    "dispatch": 1,
    "attach_status_message": 2,
}
# Calls that are not intake calls (the warm-up's) go first.
FIRST_RANK = 0


class IntakeFailed(RuntimeError):
    """What the intake process raised or returned, when that could not cross to the bot."""


class IntakeProcessStopped(RuntimeError):
    """The intake process ended with this call in hand."""


class IntakeProcess(Executor):
    """An executor whose calls run in a child process, one at a time; the child is started
    on the first call, and again after it has died."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._child: _Child | None = None
        self._stopped = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        rank = fn.rank if isinstance(fn, _IntakeCall) else FIRST_RANK
        payload = pickle.dumps(partial(fn, *args, **kwargs))
        with self._lock:
            if self._stopped:
                raise RuntimeError("the intake process has been stopped")
            if self._child is None or not self._child.alive:
                if self._child is not None:
                    log.error("the intake process stopped; starting another")
                self._child = _Child.start(self._settings)
            self._child.send(next(self._ids), rank, payload, future)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the child once it has answered the calls in hand (always waits for that)."""
        with self._lock:
            self._stopped = True
            child, self._child = self._child, None
        if child is not None:
            child.stop()

    def warm_up(self) -> int:
        """Blocks until the child has started and answers; its process id. Raises when it
        cannot start (its own log lines say why)."""
        return self.submit(os.getpid).result()

    @staticmethod
    def call(name: str) -> Callable[[list[Any]], list[Any]]:
        """The named intake call, made in the child (picklable, as crossing needs)."""
        if name not in INTAKE_CALLS:
            raise KeyError(name)
        return _IntakeCall(name)


@dataclass(frozen=True)
class _IntakeCall:
    name: str

    @property
    def rank(self) -> int:
        return CALL_RANKS[self.name]

    def __call__(self, items: list[Any]) -> list[Any]:
        if _services is None:
            raise RuntimeError("not in the intake process")
        outcomes = INTAKE_CALLS[self.name](_services, items)
        return [_sendable(one) if isinstance(one, Exception) else one for one in outcomes]


class _Child:
    """One child process, its end of the pipe, and the calls it has in hand."""

    def __init__(self, process: BaseProcess, connection: Connection) -> None:
        self.process = process
        self._connection = connection
        self._pending: dict[int, Future[Any]] = {}
        self._pending_lock = threading.Lock()
        self.alive = True
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="intake-answers", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, settings: Settings) -> _Child:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_serve, args=(theirs, settings, os.getpid()), name=PROCESS_NAME
        )
        process.start()
        theirs.close()
        return cls(process, ours)

    def send(self, call_id: int, rank: int, payload: bytes, future: Future[Any]) -> None:
        with self._pending_lock:
            if not self.alive:
                raise IntakeProcessStopped("the intake process stopped")
            self._pending[call_id] = future
        try:
            self._connection.send_bytes(_framed(call_id, bytes([rank]) + payload))
        except OSError as exc:  # it died meanwhile: the reader fails the others
            with self._pending_lock:
                self._pending.pop(call_id, None)
            raise IntakeProcessStopped(f"the intake process stopped: {exc}") from None

    def _read(self) -> None:
        while True:
            try:
                message = self._connection.recv_bytes()
            except (EOFError, OSError):
                break
            ok = message[0] == 1
            call_id, payload = _unframed(message[1:])
            with self._pending_lock:
                future = self._pending.pop(call_id)
            try:
                value = pickle.loads(payload)  # noqa: S301 (our child's)
            except Exception as exc:  # checked in the child; never expected here
                ok, value = False, IntakeFailed(f"its answer could not be read: {exc}")
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        with self._pending_lock:
            self.alive = False
            pending, self._pending = self._pending, {}
        self.process.join(STOP_TIMEOUT_S)
        if not self._stopping:
            log.error(
                "the intake process %s ended (exit code %s) with %d call(s) in hand",
                self.process.pid,
                self.process.exitcode,
                len(pending),
            )
        for future in pending.values():
            future.set_exception(
                IntakeProcessStopped(
                    f"the intake process stopped (exit code {self.process.exitcode})"
                )
            )

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):  # already gone
            self._connection.send_bytes(b"")  # nothing more: finish and stop
        self._reader.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            log.error("the intake process did not stop in %.0f s; killed", STOP_TIMEOUT_S)
            self.process.kill()
            self.process.join()
        self._connection.close()


# The child's own services, made when it starts.
_services: BotServices | None = None


def _serve(connection: Connection, settings: Settings, parent_pid: int) -> None:
    """The child: run the calls it is sent and send back each outcome, until told to stop
    (an empty message; the calls in hand are answered first) or the bot is gone."""
    global _services
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings)
    _services = bootstrap(settings.model_copy(update={"bot_intake_process": False}))
    watch = threading.Thread(target=_exit_with, args=(parent_pid,), name="parent", daemon=True)
    watch.start()
    freeze_start_up_objects()
    log.info("intake process %s up (bot process %s)", os.getpid(), parent_pid)

    def answer(call_id: int, payload: bytes) -> None:
        try:
            call = pickle.loads(payload)  # noqa: S301 (from the bot, our parent)
            ok, value = True, call()
        except BaseException as exc:  # SystemExit too: the thread serves every later call
            log.error("intake call failed", exc_info=exc)
            ok, value = False, _sendable(exc)
        try:
            answer_payload = pickle.dumps(value)
        except Exception as exc:
            ok, answer_payload = False, pickle.dumps(IntakeFailed(f"{type(exc).__name__}: {exc}"))
        connection.send_bytes(bytes([ok]) + _framed(call_id, answer_payload))

    # One call at a time, by rank, in a thread of its own, while this one reads the pipe (so
    # that the bot never waits to send): more threads cost more CPU in handing the GIL over
    # than they saved in waits, and the tail of the acknowledgements grew (BENCHMARKS.md).
    waiting: queue.PriorityQueue[tuple[int, int, bytes | None]] = queue.PriorityQueue()

    def run_in_rank_order() -> None:
        while True:
            _, call_id, payload = waiting.get()
            if payload is None:
                return
            try:
                answer(call_id, payload)
            except OSError:  # the bot is gone; the reading below ends too
                return
            except Exception as exc:  # its caller hears that, and the calls after it run
                log.exception("could not answer intake call %s", call_id)
                failed = IntakeFailed(f"its answer could not be sent: {type(exc).__name__}")
                with contextlib.suppress(Exception):
                    connection.send_bytes(bytes([0]) + _framed(call_id, pickle.dumps(failed)))

    runner = threading.Thread(target=run_in_rank_order, name="intake")
    runner.start()
    while True:
        try:
            message = connection.recv_bytes()
        except (EOFError, OSError):
            break
        if not message:
            break
        call_id, ranked = _unframed(message)
        waiting.put((ranked[0], call_id, ranked[1:]))
    # After every call in hand, whatever its rank: nothing is sent after the stop.
    waiting.put((_AFTER_EVERY_RANK, 0, None))
    runner.join()
    connection.close()
    assert _services is not None
    _services.close()


# Each message on the pipe: the call's id, then its rank (one byte) and pickled call, or its
# outcome (an answer is led by one byte, 1 when it is a result and 0 when an exception). The
# id is read without unpickling, so that a payload that cannot be read still fails only its
# own call.
_ID_BYTES = 8
_AFTER_EVERY_RANK = 256


def _framed(call_id: int, payload: bytes) -> bytes:
    return call_id.to_bytes(_ID_BYTES, "little") + payload


def _unframed(message: bytes) -> tuple[int, bytes]:
    return int.from_bytes(message[:_ID_BYTES], "little"), message[_ID_BYTES:]


def _exit_with(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_S)
    log.error("the bot process %s is gone; the intake process stops", parent_pid)
    os._exit(1)


def _sendable(exc: BaseException) -> Exception:
    """The exception itself when it crosses to the bot intact; one that could not be read
    there, or that is not an Exception, is told as an IntakeFailed with its type and text."""
    if not isinstance(exc, Exception):
        return IntakeFailed(f"{type(exc).__name__}: {exc}")
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 (made here, from this process's own)
    except Exception:
        return IntakeFailed(f"{type(exc).__name__}: {exc}")
    return exc
