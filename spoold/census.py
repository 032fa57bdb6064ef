"""Counts kept beside the directories they count, so that a submit behind 100,000 queued tasks and a
`status` over a month of finished ones need not list them all (40 ms and 70 ms of listing here).

Both are caches in the sense of the spool format: the directory is the truth, and a count is trusted
only while the directory's mtime and inode are what they were when it was counted (any name added,
removed or renamed in it changes its mtime). Any process that has listed a directory may write its
count (tmp + rename, no fsync: a lost or stale count is only a listing the next reader makes itself).
They live in `.spoold/cache/`, which stays on each machine of a synced spool.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spoold import spool
from spoold.config import Settings
from spoold.leftovers import leftover_mark
from spoold.spool import QueuedListing, Spool
from spoold.task import Task

QUEUE_MIN = 2_000  # below this many queued, listing them is cheaper than any cache
FRESH_S = 2.0  # a queue count this young is near enough even if the queue moved since (the daemon claims)
QUIET_NS = 100_000_000  # a directory changed this recently may change again within its mtime's clock tick


def _settled(st: os.stat_result) -> bool:
    """Whether a count made now can be trusted later: a name added within the same tick as the last change
    would leave the mtime as it was."""
    return time.time_ns() - st.st_mtime_ns > QUIET_NS


@dataclass
class Census:
    """How many queued tasks there are per priority digit, with and without a not_before."""

    stamp: tuple[int, int]  # queued/'s (st_mtime_ns, st_ino) when it was counted
    untimed: list[int]
    timed: list[int]
    written: float

    def exact(self, st: os.stat_result) -> bool:
        return self.stamp == (st.st_mtime_ns, st.st_ino)


def _write(sp: Spool, name: str, value: object) -> None:
    path = spool.cache_path(sp, name)
    tmp = path.with_name(f".{spool.owner_tag()}.{os.urandom(4).hex()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp.write_bytes(json.dumps(value).encode())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _read(sp: Spool, name: str) -> Any:
    try:
        return json.loads(spool.cache_path(sp, name).read_bytes())
    except (OSError, ValueError):
        return None


def read(sp: Spool) -> Census | None:
    v = _read(sp, "queued.json")
    try:
        return Census((int(v["mtime_ns"]), int(v["ino"])), [int(x) for x in v["untimed"]],
                      [int(x) for x in v["timed"]], float(v["written"]))
    except (KeyError, TypeError, ValueError):
        return None


def _save(sp: Spool, c: Census) -> None:
    _write(sp, "queued.json", {"mtime_ns": c.stamp[0], "ino": c.stamp[1], "untimed": c.untimed, "timed": c.timed,
                               "written": c.written})
    sp.local.census_stamp = c.stamp


def keep(sp: Spool, listing: QueuedListing) -> None:
    """Count a deep queue's listing per priority (by bisection: a name is `P.NOTBEFORE.ID.md`, sorted) and
    keep the count, if queued/ did not change while it was listed and it is not the count kept already."""
    if len(listing) < QUEUE_MIN or listing.stamp is None or sp.local.census_stamp == listing.stamp:
        return
    after = os.stat(sp.dir("queued"))
    if (after.st_mtime_ns, after.st_ino) != listing.stamp or not _settled(after):
        return
    names, untimed, timed = listing.names, [0] * 10, [0] * 10
    for d in range(10):
        lo = bisect.bisect_left(names, f"{d}.")
        mid = bisect.bisect_left(names, f"{d}.{spool.NO_TIME}/")  # '/' sorts after '.', before any digit
        hi = bisect.bisect_left(names, f"{d}/")
        untimed[d], timed[d] = mid - lo, hi - mid
    _save(sp, Census(listing.stamp, untimed, timed, time.time()))


def place(sp: Spool, task: Task, settings: Settings, census: Census | None, before: os.stat_result) -> int | None:
    """A task just queued: its place from the census read before it went in, instead of a listing. Exact
    when the census matched queued/ then (and it counts this task in, for the next submit); near enough
    when a second or two old (claims moved the queue on since). None: the caller lists instead.

    Two submits in the same clock tick can leave the count one short until the next listing: it only
    feeds estimates."""
    if census is None or settings.strategy != "priority" or task.not_before is not None:
        return None
    p = spool.PRIORITIES[task.priority]
    if any(census.timed[: p + 1]) or sum(census.untimed) < QUEUE_MIN:
        return None  # a not_before ahead of us: its place depends on the time
    exact = census.exact(before)
    if not exact and time.time() - census.written > FRESH_S:
        return None
    ahead = sum(census.untimed[: p + 1])
    if exact:
        with contextlib.suppress(OSError):
            st = os.stat(sp.dir("queued"))
            census.untimed[p] += 1
            census.stamp, census.written = (st.st_mtime_ns, st.st_ino), time.time()
            _save(sp, census)
    return ahead + 1


def finished(sp: Spool, state: str) -> list[tuple[Path, int, int, list[str]]]:
    """Per directory of a terminal state: (directory, task files, duplicate answers, names that may be a sync
    tool's leftover). A directory unchanged since it was last counted is not listed; a day's partition
    changes only on its day."""
    kept = _read(sp, f"{state}.json")
    kept = kept if isinstance(kept, dict) else {}
    out, fresh, changed = [], {}, False
    for d in spool.terminal_dirs(sp, state):
        try:
            st = os.stat(d)
        except FileNotFoundError:
            continue
        stamp = [st.st_mtime_ns, st.st_ino]
        old = kept.get(d.name)
        if isinstance(old, list) and len(old) == 4 and old[0] == stamp:
            counts = old
        else:
            names = os.listdir(d)
            counts = [stamp if _settled(st) else None, spool.count_task_files(names), spool.count_duplicates(names),
                      [n for n in names if leftover_mark(n)]]
            changed = True
        fresh[d.name] = counts
        out.append((d, int(counts[1]), int(counts[2]), list(counts[3])))
    if changed or set(fresh) != set(kept):
        _write(sp, f"{state}.json", fresh)
    return out

