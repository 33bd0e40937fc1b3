"""Start-up's objects are frozen out of the garbage collector's sight, its garbage freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from chitrakar.process import freeze_start_up_objects


class _Node:
    def __init__(self) -> None:
        self.partner: _Node | None = None


@pytest.fixture
def thawed() -> Iterator[None]:
    # No automatic collection in between: only the function under test may free the cycle.
    gc.unfreeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()  # the rest of the test run collects as usual


def test_start_up_garbage_is_freed_and_what_lives_on_is_frozen(thawed: None) -> None:
    # A cycle nothing refers to any more: only a collection frees it. Frozen, it never would.
    first, second = _Node(), _Node()
    first.partner, second.partner = second, first
    gone = weakref.ref(first)
    del first, second
    kept = [_Node() for _ in range(100)]

    freeze_start_up_objects()

    assert gone() is None
    assert gc.get_freeze_count() >= len(kept)
