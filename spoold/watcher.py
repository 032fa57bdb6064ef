"""Watching the spool: filesystem events as hints that wake the daemon (a periodic scan covers what they miss)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from spoold import intake, spool
from spoold.spool import Spool

if TYPE_CHECKING:
    from watchfiles import Change

log = logging.getLogger("spoold")


class Watcher:
    """Watch inbox/, queued/, running/ and the spool root; call `on_news` for whatever may mean new work.

    `foreign_in_queued` says a foreign tool wrote straight into queued/ (the daemon takes it in at once).
    """

    def __init__(self, sp: Spool, on_news: Callable[[], None]) -> None:
        self.sp = sp
        self.on_news = on_news
        self.foreign_in_queued = False
        self._owner = spool.owner_tag()
        self._probe = spool.watch_probe_path(sp)
        self._watching = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        from watchfiles import awatch  # lazy: `spoold submit` must not pay for the watcher

        queued = self.sp.dir("queued")
        paths = [self.sp.dir("inbox"), queued, self.sp.dir("running"), self.sp.root]
        async for changes in awatch(*paths, watch_filter=None, debounce=200, step=2, recursive=False,
                                    stop_event=stopping, ignore_permission_denied=True):
            news = False
            for change, p in changes:
                path = Path(p)
                if path.name == self._probe.name:
                    self._watching.set()
                    news = True
                elif is_news(self.sp, change, path, self._owner):
                    news = True
                    if path.parent == queued and not spool.parse_queued_name(path.name):
                        self.foreign_in_queued = True
            if news:
                self.on_news()

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


def is_news(sp: Spool, change: Change, path: Path, owner: str) -> bool:
    """Whether an event can mean new work; our own claims and moves (one per task) are not news."""
    from watchfiles import Change

    if path.parent == sp.dir("inbox") and change == Change.deleted and intake.lock_target(path.name):
        return True  # an editor let go of a file: it may be a task now
    if path.parent in (sp.dir("queued"), sp.dir("inbox")):
        return change != Change.deleted  # a file leaving the inbox or the queue never makes work
    if path.parent == sp.dir("running"):
        if spool.parse_cancel_marker(path.name) is not None:
            return True
        entry = spool.parse_running_name(path.name)
        mine = entry is not None and entry.owner == owner
        return change == Change.deleted and not mine  # a slot another daemon held is free
    return True
