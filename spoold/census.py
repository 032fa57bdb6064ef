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
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spoold import spool
from spoold.config import Settings
from spoold.spool import QueuedListing, Spool
from spoold.task import Task

QUEUE_MIN = 2_000  # below this many queued, listing them is cheaper than any cache
FRESH_S = 2.0  # a queue count this young is near enough even if the queue moved since (the daemon claims)
CARRIED_S = 60.0  # how long counts carried forward by submits (not by a listing) are trusted at all
QUIET_NS = 100_000_000  # a directory changed this recently may change again within its mtime's clock tick


def _settled(st: os.stat_result) -> bool:
    """Whether a count made now can be trusted later: a name added within the same clock tick as the last
    change would leave the mtime as it was (a whole-second mtime: a filesystem that keeps only seconds)."""
    quiet = QUIET_NS if st.st_mtime_ns % 1_000_000_000 else 2_000_000_000
    return time.time_ns() - st.st_mtime_ns > quiet


@dataclass
class Census:
    """How many queued tasks there are per priority digit, with and without a not_before."""

    stamp: tuple[int, int, int]  # queued/'s spool.dir_stamp when these counts were true
    untimed: list[int]
    timed: list[int]
    written: float
    listed: float  # when the listing they come from was made (later submits carry them forward)
    head: list[str] = field(default_factory=list)  # the first HEAD names in dispatch order (priority strategy)
    oldest: str | None = None  # the earliest submitted task's id


HEAD = 64  # names kept for `status`: its next start needs the first, and a listing of a million takes a second


def _finished_cache(state: str) -> str:
    """The cache of a terminal state's counts; `-2`: counts that include rejected entries (`ID.rejected`), so
    that counts made before them are not trusted."""
    return f"{state}-2.json"


def _write(sp: Spool, name: str, value: object) -> None:
    spool.write_cache(spool.cache_path(sp, name), value)


def _read(sp: Spool, name: str) -> Any:
    return spool.read_cache(spool.cache_path(sp, name))


def read(sp: Spool) -> Census | None:
    v = _read(sp, "queued.json")
    try:
        m, c, ino = (int(x) for x in v["stamp"])
        head = [str(n) for n in v.get("head") or [] if spool.is_queued_name(str(n))]
        oldest = str(v["oldest"]) if v.get("oldest") else None
        return Census((m, c, ino), [int(x) for x in v["untimed"]], [int(x) for x in v["timed"]],
                      float(v["written"]), float(v["listed"]), head, oldest)
    except (KeyError, TypeError, ValueError):
        return None


def _save(sp: Spool, c: Census) -> None:
    _write(sp, "queued.json", {"stamp": list(c.stamp), "untimed": c.untimed, "timed": c.timed,
                               "written": c.written, "listed": c.listed, "head": c.head, "oldest": c.oldest})


def keep(sp: Spool, listing: QueuedListing) -> None:
    """Count a deep queue's listing per priority (by bisection: a name is `P.NOTBEFORE.ID.md`, sorted) and
    keep the count, if queued/ did not change while it was listed and it is not the count kept already."""
    if len(listing) < QUEUE_MIN or listing.stamp is None or sp.local.census_stamp == listing.stamp:
        return
    if not listing.ordered:  # a listing the census itself vouched for: nothing new to count, but perhaps its head
        c = read(sp)
        if c is not None and c.stamp == listing.stamp and c.listed == c.written and not c.head and len(listing):
            c.head, c.oldest = listing.first_names(HEAD), listing.oldest_id()
            with contextlib.suppress(OSError):
                _save(sp, c)
        return
    after = os.stat(sp.dir("queued"))
    if spool.dir_stamp(after) != listing.stamp or not _settled(after):
        return
    names, untimed, timed = listing.names, [0] * 10, [0] * 10
    for d in range(10):
        lo = bisect.bisect_left(names, f"{d}.")
        mid = bisect.bisect_left(names, f"{d}.{spool.NO_TIME}/")  # '/' sorts after '.', before any digit
        hi = bisect.bisect_left(names, f"{d}/")
        untimed[d], timed[d] = mid - lo, hi - mid
    now = time.time()
    head = [] if listing.unparsed else names[:HEAD]  # other names in queued/: `status` must list to report them
    _save(sp, Census(listing.stamp, untimed, timed, now, now, head, listing.oldest_id()))
    sp.local.census_stamp = listing.stamp  # this state is counted: the next listing of it need not be


def kept_queue(sp: Spool) -> tuple[int, QueuedListing, str | None] | None:
    """queued/ as a census from a listing of this very state of it keeps it: (how many tasks, the first HEAD in
    dispatch order, the oldest id), with one stat and no listing: `status` over a million queued tasks."""
    c = read(sp)
    if c is None or not c.head or c.listed != c.written:
        return None
    stamp = spool.dir_stamp(os.stat(sp.dir("queued")))
    if c.stamp != stamp:
        return None
    return sum(c.untimed) + sum(c.timed), QueuedListing(c.head, stamp=stamp), c.oldest


def trust(sp: Spool) -> Callable[[tuple[int, int, int], int], bool]:
    """For spool.list_queued: a listing needs no checking when a census counted from a listing (not carried
    forward by submits) matches queued/ as it is now and counts every name in it as valid."""
    c = read(sp)

    def trusted(stamp: tuple[int, int, int], count: int) -> bool:
        return c is not None and c.stamp == stamp and c.listed == c.written and count == sum(c.untimed) + sum(c.timed)

    return trusted


@dataclass
class Seen:
    """What a submit saw just before its task went in: queued/'s stat and the census then."""

    before: os.stat_result
    census: Census | None


@contextlib.contextmanager
def submitting(sp: Spool) -> Iterator[Seen]:
    """Around one submit's enqueue: submits take turns (an flock on the cache's own lock), so each one
    that finds the census exact can count itself in, and the next finds it exact in turn."""
    fd = None
    with contextlib.suppress(OSError):
        lock = spool.cache_path(sp, "queued.lock")
        lock.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield Seen(os.stat(sp.dir("queued")), read(sp))
    finally:
        if fd is not None:
            os.close(fd)  # the flock goes with it


def place(sp: Spool, task: Task, settings: Settings, seen: Seen) -> int | None:
    """A task just queued: its place from the census seen before it went in, instead of a listing. Exact
    when that census matched queued/ then (and then it counts this task in, for the next submit); near
    enough when a second or two old (the daemon's claims moved the queue on since). None: list instead.

    A claim between a submit's two looks at queued/ is counted as still queued, one place too many, by
    the counts carried forward; they are trusted for CARRIED_S after the listing they come from."""
    c = seen.census
    if c is None or settings.strategy != "priority" or task.not_before is not None:
        return None
    p = spool.PRIORITIES[task.priority]
    if any(c.timed[: p + 1]) or sum(c.untimed) < QUEUE_MIN:
        return None  # a not_before ahead of us: its place depends on the time
    now = time.time()
    exact = c.stamp == spool.dir_stamp(seen.before)
    if (not exact and now - c.written > FRESH_S) or now - c.listed > CARRIED_S:
        return None
    ahead = sum(c.untimed[: p + 1])
    if exact:
        with contextlib.suppress(OSError):
            c.stamp, c.written = spool.dir_stamp(os.stat(sp.dir("queued"))), now
            c.untimed[p] += 1
            _save(sp, c)
    return ahead + 1


def finished(sp: Spool, state: str) -> list[tuple[Path, int, int, list[str]]]:
    """Per directory of a terminal state: (directory, task files, duplicate answers, names that may be a sync
    tool's leftover). A directory unchanged since it was last counted is not listed; a day's partition
    changes only on its day."""
    from spoold.leftovers import leftover_mark  # lazy: only `status` counts them, and a submit imports census

    kept = _read(sp, _finished_cache(state))
    kept = kept if isinstance(kept, dict) else {}
    out, fresh, changed = [], {}, False
    for d in spool.terminal_dirs(sp, state):
        try:
            st = os.stat(d)
        except FileNotFoundError:
            continue
        stamp = list(spool.dir_stamp(st))
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
        _write(sp, _finished_cache(state), fresh)
        if not kept:  # the first count in this form: the one before it (`STATE.json`, no rejected entries) goes
            with contextlib.suppress(OSError):
                spool.cache_path(sp, f"{state}.json").unlink(missing_ok=True)
    return out

