"""Blocking calls that arrive together, made together in one worker thread (or, through
the executor given, in the bot's intake process: bot.intake_process).

Under load, python-telegram-bot starts the updates of one getUpdates answer (or the webhook
posts that came in at once) in the same turn of the event loop, and each would hand its
database work to a thread of its own: a thread hop, a transaction and a wake-up of the loop
per update, all contending for one GIL. A `Coalesced` call collects what is asked in one turn
and makes one call for all of it in a thread; a lone call waits one extra turn of the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# What one call takes at most: the first caller of a batch hears back when all of it is
# done, so a burst is cut into batches that run side by side.
MAX_BATCH = 16


class Coalesced(Generic[Item, Result]):
    """`await call(item)` gives the item's result, or raises the exception `run_many` gave
    for it. `run_many` blocks; it gets the items in the order they were asked for and returns
    one outcome per item: its result, or the exception to raise in that caller alone. It runs
    in `executor` (by default the event loop's threads)."""

    def __init__(
        self,
        run_many: Callable[[list[Item]], Sequence[Result | BaseException]],
        max_batch: int = MAX_BATCH,
        executor: Executor | None = None,
    ) -> None:
        self._run_many = run_many
        self._max_batch = max_batch
        self._executor = executor
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        # Batches in their threads: a task nothing refers to may be collected.
        self._running: set[asyncio.Task[None]] = set()

    async def __call__(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((item, answer))
        if len(self._waiting) == 1:
            # After the callbacks already due in this turn: the other updates started in it.
            loop.call_soon(self._start_batches)
        return await answer

    def _start_batches(self) -> None:
        # A caller cancelled meanwhile (its update's handling stopped) asks for nothing.
        waiting = [(item, answer) for item, answer in self._waiting if not answer.done()]
        self._waiting = []
        for start in range(0, len(waiting), self._max_batch):
            task = asyncio.create_task(self._run(waiting[start : start + self._max_batch]))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_many, [item for item, _ in batch]
            )
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} calls")
        except asyncio.CancelledError:
            # The bot is stopping: its callers stop too, rather than each hearing of a failure
            # (the call may still finish in its thread).
            for _, answer in batch:
                answer.cancel()
            raise
        except BaseException as exc:  # every caller hears it; none is left waiting
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc if len(batch) == 1 else _own_copy(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, answer), outcome in zip(batch, outcomes, strict=True):
            if answer.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(outcome, BaseException):
                answer.set_exception(outcome)
            else:
                answer.set_result(outcome)


class CoalescedCallFailed(Exception):
    """The call made for several callers raised; each of them gets one of these, caused by
    it (one exception object raised in several tasks would have its traceback rewritten by
    each)."""


def _own_copy(exc: BaseException) -> BaseException:
    copy = CoalescedCallFailed(f"{type(exc).__name__}: {exc}")
    copy.__cause__ = exc
    return copy
