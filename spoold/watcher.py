"""Watching the spool: filesystem events as hints that wake the daemon (a periodic scan covers what they miss)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from spoold import intake, spool
from spoold.spool import Spool

if TYPE_CHECKING:
    from watchfiles import Change

log = logging.getLogger("spoold")
MAX_EXPECTED = 10_000


class Watcher:
    """Watch inbox/, queued/, running/ and the spool root; call `on_news(inbox_only)` for whatever may mean new
    work (`inbox_only`: every change in that batch was in inbox/, which intake alone answers).

    `foreign_seen` counts the times a foreign tool wrote straight into queued/ (the daemon takes such a file
    in at once); only the watcher's thread writes it, so a reader that compares it with the count it saw last
    misses none.

    `expect(name)` is told by this daemon's intake of each name it is about to link into queued/: the loop hears
    of those from the intake itself, so their events are not news (one listing less a drop, and no second turn
    beside the start it brings). `alive`: the watcher answered its probe and has not stopped; while it is not,
    the daemon relies on its scan interval alone.
    """

    def __init__(self, sp: Spool, on_news: Callable[[bool], None]) -> None:
        self.sp = sp
        self.on_news = on_news
        self.foreign_seen = 0
        self._expected: set[str] = set()  # added by the intake's thread, taken by the watcher's (set ops are atomic)
        self._owner = spool.owner_tag()
        self._probe = spool.watch_probe_path(sp)
        self._watching = asyncio.Event()
        self._stopped = False

    @property
    def alive(self) -> bool:
        return self._watching.is_set() and not self._stopped

    def expect(self, name: str) -> None:
        if len(self._expected) >= MAX_EXPECTED:  # events the watcher never saw (an overflow): forget, news again
            self._expected.clear()
        self._expected.add(name)

    def sort(self, changes: set[tuple[Change, str]]) -> tuple[bool, bool, bool]:
        """One batch of events: (news, the probe seen, news outside inbox/)."""
        from watchfiles import Change

        sp, queued, inbox = self.sp, str(self.sp.dir("queued")), str(self.sp.dir("inbox"))
        news = probed = elsewhere = False
        ours: dict[str, bool] = {}  # our intake's copies seen in this batch -> whether one of their events was a removal
        for change, p in changes:
            parent, name = os.path.split(p)
            if name == self._probe.name:  # the watcher is up: nothing changed for the queue (it ended the
                probed = True  # first pass over a deep queue after one start, and cost its listing again)
            elif parent == queued and name in self._expected:  # our intake's own copy, linked (then claimed)
                ours[name] = ours.get(name, False) or change == Change.deleted
            elif is_news(sp, change, parent, name, self._owner):
                news, elsewhere = True, elsewhere or parent != inbox
                if parent == queued and not spool.parse_queued_name(name):
                    self.foreign_seen += 1
        for name, removed in ours.items():
            self._expected.discard(name)
            # A batch is a set: linked and claimed looks the same as claimed and put back under the same name (an
            # unclaim), which is news. Our link always comes first, so a name removed in the batch yet still
            # there was put back.
            if removed and os.path.lexists(os.path.join(queued, name)):
                news = elsewhere = True
        return news, probed, elsewhere

    async def run(self, stopping: asyncio.Event) -> None:
        """Watch until `stopping`, in a thread of our own on watchfiles' blocking `watch`: events are sorted
        there, and the loop hears only of news (our own moves, a few per task, cost it nothing)."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        thread = threading.Thread(target=self._watch, args=(loop, stop), name="spoold-watch", daemon=True)
        thread.start()
        try:
            await stopping.wait()
        finally:
            stop.set()  # watchfiles looks at it every step (2 ms)
            thread.join(timeout=1.0)

    def _watch(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        from watchfiles import watch  # lazy: `spoold submit` must not pay for the watcher

        sp = self.sp
        paths = [sp.dir("inbox"), sp.dir("queued"), sp.dir("running"), sp.root]

        def tell(fn: Callable[[], object]) -> bool:
            try:
                loop.call_soon_threadsafe(fn)
                return True
            except RuntimeError:  # the loop closed under us: the daemon has stopped
                return False

        try:
            for changes in watch(*paths, watch_filter=None, debounce=200, step=2, recursive=False, stop_event=stop,
                                 ignore_permission_denied=True, raise_interrupt=False):
                news, probed, elsewhere = self.sort(changes)
                if (probed and not tell(self._watching.set)) or (
                        news and not tell(functools.partial(self.on_news, not elsewhere))):
                    return
        except Exception as e:  # the periodic scan goes on without us
            log.warning("the file watcher stopped (%s); relying on a scan every few seconds", e)
        finally:
            self._stopped = True

    async def ready(self, scan_interval_s: float, timeout_s: float = 5.0) -> None:
        """Touch a probe until the watcher reports it, so no drop falls between the first scan and the watch."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self._watching.is_set() and time.monotonic() < deadline:
                self._probe.touch(mode=0o600)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._watching.wait(), 0.05)
        finally:
            self._probe.unlink(missing_ok=True)
        if not self._watching.is_set():
            log.warning("the file watcher did not answer; relying on a scan every %g s", scan_interval_s)


def is_news(sp: Spool, change: Change, parent: str, name: str, owner: str) -> bool:
    """Whether an event (on `name` in directory `parent`) can mean new work; our own claims and moves (one per
    task) are not news."""
    from watchfiles import Change

    inbox = str(sp.dir("inbox"))
    if parent == inbox and change == Change.deleted and intake.lock_target(name):
        return True  # an editor let go of a file: it may be a task now
    if parent == inbox or parent == str(sp.dir("queued")):
        return change != Change.deleted  # a file leaving the inbox or the queue never makes work
    if parent == str(sp.dir("running")):
        if spool.parse_cancel_marker(name) is not None:
            return True
        if spool.is_watch_probe(name):  # another daemon's, here or on a synced host: it frees no slot
            return False
        if name.endswith(spool.PARTIAL_SUFFIX):  # an answer so far, written and removed by its task's owner:
            return False  # it frees no slot (its task file's move does), so a task's end costs no new listing
        entry = spool.parse_running_name(name)
        mine = entry is not None and entry.owner == owner
        return change == Change.deleted and not mine  # a slot another daemon held is free
    return True
