"""Calls that arrive in one turn of the event loop are made as one call in a thread, and each
caller hears its own outcome."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from bot.coalescing import Coalesced, CoalescedCallFailed


class Recorder:
    """A `run_many` that records the batches it was given and the threads it ran in."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self._fail = fail or set()

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        return [ValueError(item) if item in self._fail else item * 10 for item in items]


def held_until(release: threading.Event) -> Callable[[list[int]], list[int]]:
    """A `run_many` that returns its items once `release` is set (5 s at most)."""

    def run_many(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    return run_many


async def test_calls_made_in_one_turn_are_one_call_in_a_thread_in_order() -> None:
    recorder = Recorder()
    call = Coalesced(recorder)
    results = await asyncio.gather(*(call(n) for n in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert recorder.batches == [[0, 1, 2, 3, 4]]
    assert threading.get_ident() not in recorder.threads


async def test_a_lone_call_and_calls_in_later_turns_are_made_on_their_own() -> None:
    recorder = Recorder()
    call = Coalesced(recorder)
    assert await call(1) == 10
    assert await call(2) == 20
    assert recorder.batches == [[1], [2]]


async def test_an_items_exception_is_raised_in_its_caller_alone() -> None:
    call = Coalesced(Recorder(fail={2}))
    outcomes = await asyncio.gather(*(call(n) for n in range(4)), return_exceptions=True)
    assert outcomes[:2] == [0, 10] and outcomes[3] == 30
    assert isinstance(outcomes[2], ValueError) and outcomes[2].args == (2,)


async def test_when_the_whole_call_fails_every_caller_hears_it_in_an_exception_of_its_own() -> None:
    def broken(items: list[int]) -> list[int]:
        raise ConnectionError("database gone")

    call = Coalesced(broken)
    outcomes = await asyncio.gather(*(call(n) for n in range(3)), return_exceptions=True)
    assert all(isinstance(outcome, CoalescedCallFailed) for outcome in outcomes)
    assert len({id(outcome) for outcome in outcomes}) == 3
    assert all(isinstance(outcome.__cause__, ConnectionError) for outcome in outcomes)
    # Alone, a caller hears the exception itself.
    with pytest.raises(ConnectionError):
        await call(1)


async def test_a_wrong_number_of_outcomes_is_an_error_for_every_caller() -> None:
    call: Coalesced[int, int] = Coalesced(lambda items: [1])
    outcomes = await asyncio.gather(call(1), call(2), return_exceptions=True)
    assert all(isinstance(outcome.__cause__, RuntimeError) for outcome in outcomes)  # type: ignore[union-attr]


async def test_a_caller_cancelled_before_its_batch_starts_asks_for_nothing() -> None:
    recorder = Recorder()
    call = Coalesced(recorder)
    first = asyncio.create_task(call(1))
    second = asyncio.create_task(call(2))
    await asyncio.sleep(0)  # both are waiting; their batch starts in the next turn
    first.cancel()
    assert await second == 20
    assert recorder.batches == [[2]]


async def test_a_burst_is_cut_into_batches_that_run_side_by_side() -> None:
    both_running = threading.Barrier(2, timeout=5)

    def run_many(items: list[int]) -> list[int]:
        both_running.wait()  # each batch waits for the other: they must run at once
        return items

    call = Coalesced(run_many, max_batch=3)
    assert await asyncio.gather(*(call(n) for n in range(6))) == list(range(6))


async def test_a_cancelled_caller_leaves_the_others_their_answers() -> None:
    release = threading.Event()
    call = Coalesced(held_until(release))
    first = asyncio.create_task(call(1))
    second = asyncio.create_task(call(2))
    await asyncio.sleep(0.05)
    first.cancel()
    release.set()
    assert await second == 2
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_when_the_call_is_cancelled_its_callers_are_cancelled_not_failed() -> None:
    release = threading.Event()
    call = Coalesced(held_until(release))
    callers = [asyncio.create_task(call(n)) for n in range(2)]
    await asyncio.sleep(0.05)  # their batch is in its thread
    # As asyncio.run cancels what is left when the bot stops: the batch's task.
    for batch in asyncio.all_tasks() - {asyncio.current_task(), *callers}:
        batch.cancel()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    release.set()
    assert all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes)
