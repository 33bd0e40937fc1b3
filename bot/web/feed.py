"""Following the web chats' change feed for the pages that are open.

Messages are written by this process (answers) and by workers elsewhere (progress, results),
so the database is where changes meet. One poller per process reads the feed (one query
however many pages are open) and wakes the pages of the chats that changed; each page then
reads its own chat's changes after the last one it showed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from db import web
from db.session import Store

log = logging.getLogger(__name__)

# How often the poller reads the feed: the delay a change may wait before a page shows it.
POLL_INTERVAL_S = 0.25
# Changes of different chats may commit out of id order (PostgreSQL): each poll reads again
# this many ids below the last it saw, and wakes pages for those it had not seen.
LOOKBACK_IDS = 500


@dataclass(frozen=True)
class Changes:
    """What a page has to show since its last change: the messages as they are now, or
    (`cleared`) that the chat was deleted and the page must start again."""

    last: int
    messages: list[web.MessageView] = field(default_factory=list)
    cleared: bool = False


class ChangeFeed:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiting: dict[int, set[asyncio.Event]] = {}
        self._last = 0
        # Recent change ids already seen, oldest first.
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self.closing = asyncio.Event()

    async def start(self) -> None:
        self._last = await asyncio.to_thread(self._last_id)
        self._task = asyncio.create_task(self._poll(), name="web-chat-feed")

    async def stop(self) -> None:
        """Wake every page so that its stream ends (the server is stopping)."""
        self.closing.set()
        for events in self._waiting.values():
            for event in events:
                event.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _last_id(self) -> int:
        with self._store.unit_of_work() as uow:
            return web.last_change_id(uow)

    def _changed_chats(self) -> set[int]:
        with self._store.unit_of_work() as uow:
            changes = web.changes_after(uow, max(self._last - LOOKBACK_IDS, 0))
        fresh = [(change, chat) for change, chat, _ in changes if change not in self._seen]
        for change, _ in fresh:
            self._seen[change] = None
        while len(self._seen) > 4 * LOOKBACK_IDS:
            self._seen.popitem(last=False)
        if changes:
            self._last = max(self._last, changes[-1][0])
        return {chat for _, chat in fresh}

    async def _poll(self) -> None:
        while True:
            try:
                for chat in await asyncio.to_thread(self._changed_chats):
                    for event in self._waiting.get(chat, ()):
                        event.set()
            except Exception:
                # The database may be away for a moment: pages keep waiting, nothing is lost
                # (they read from their own last change when woken).
                log.warning("could not read the web chat feed", exc_info=True)
            await asyncio.sleep(POLL_INTERVAL_S)

    def subscribe(self, chat_id: int) -> asyncio.Event:
        event = asyncio.Event()
        self._waiting.setdefault(chat_id, set()).add(event)
        return event

    def unsubscribe(self, chat_id: int, event: asyncio.Event) -> None:
        waiting = self._waiting.get(chat_id)
        if waiting is not None:
            waiting.discard(event)
            if not waiting:
                del self._waiting[chat_id]

    def changes(self, chat_id: int, after: int) -> Changes:
        """The chat's messages changed after change `after` (each once, as it is now), and
        the last change id read. Blocking."""
        with self._store.unit_of_work() as uow:
            changes = web.changes_after(uow, after, chat_id)
            if not changes:
                return Changes(after, [])
            ids = {message for _, _, message in changes}
            last = changes[-1][0]
            if web.CLEARED in ids:
                return Changes(last, [], cleared=True)
            return Changes(last, web.messages(uow, chat_id, sorted(ids)))
