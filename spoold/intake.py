"""Inbox → queued: the ignore rules, the is-it-finished check, and turning a dropped file into a task."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from spoold import options, spool, transitions
from spoold.config import Settings
from spoold.errors import BadInput
from spoold.leftovers import among
from spoold.spool import Spool
from spoold.task import Task, parse_user_task, render_task

log = logging.getLogger("spoold")

TASK_SUFFIXES = (".md", ".markdown", ".txt")

# Names that belong to editors, sync tools and the OS: never touched, never tasks.
IGNORE_PATTERNS = (
    r"^\.",  # dotfiles: vim .x.swp, emacs .#x, rsync .x.XXXXXX, .syncthing.x.tmp, .DS_Store, .~lock.x#
    r"~$",  # backup files x~
    r"^#.*#$",  # emacs auto-save #x#
    r"^4913$",  # vim's write test file
    r"^~\$",  # Office lock files ~$x.docx
    r"\.(swp|swo|swx|tmp|temp|part|partial|crdownload|download)$",
    r"^(Thumbs\.db|desktop\.ini|Icon\r)$",
)
_IGNORE_RE = re.compile("|".join(IGNORE_PATTERNS), re.IGNORECASE)
DEFAULT_SETTLE_S = 1.0  # quiet time: with no way to tell whether a writer is open, or after an inode changed

# What an editor leaves beside a file it still has open: while one exists, the file is a draft (vim's
# first `:w` must not become a task of its own). `{}` is the file's name. Neovim keeps its swap files
# elsewhere by default and VS Code, gedit and most GUI editors save atomically: nothing to see for them.
EDITOR_LOCKS: tuple[tuple[str, str], ...] = (
    ("vim", ".{}.swp"), ("vim", ".{}.swo"), ("vim", ".{}.swn"),  # also nano's .NAME.swp
    ("emacs", ".#{}"),  # a symbolic link to user@host.PID:boot
    ("kate", ".{}.kate-swp"),
)
_LOCK_RE = re.compile(r"^\.(?:#(?P<emacs>.+)|(?P<name>.+)\.(?:sw[a-p]|kate-swp))$")
STALE_LOCK_S = 24 * 3600.0  # a lock whose owner cannot be checked is believed for a day


def is_ignored(name: str) -> bool:
    """True for names that are not ours to touch (temp, lock, swap and sync files)."""
    return bool(_IGNORE_RE.search(name))


def locked_by_editor(directory: Path, name: str, present: set[str], reported: set[str] | None = None) -> str | None:
    """The editor lock or swap file that says `name` is still being edited, if a live one is there
    (`reported`: stale locks already logged, so each is said once)."""
    for _, pattern in EDITOR_LOCKS:
        lock = pattern.format(name)
        if lock in present and not _stale(directory / lock, set() if reported is None else reported):
            return lock
    return None


def lock_target(lock_name: str) -> str | None:
    """The file an editor lock or swap name is about (`.q.md.swp` -> `q.md`), for the watcher's news."""
    m = _LOCK_RE.match(lock_name)
    return (m.group("emacs") or m.group("name")) if m else None


def _stale(lock: Path, reported: set[str]) -> bool:
    """A lock whose editor is gone: its process is dead on this host, or it is older than STALE_LOCK_S."""
    try:
        st = os.lstat(lock)
    except FileNotFoundError:
        return True
    owner = _lock_owner(lock, st)
    here = os.uname().nodename
    dead = owner is not None and owner[0] in (here, here.split(".")[0]) and not spool.pid_alive(owner[1])
    stale = dead or (owner is None and time.time() - st.st_mtime > STALE_LOCK_S)
    if stale and str(lock) not in reported:
        reported.add(str(lock))
        log.warning("ignoring %s: the editor that left it is gone (delete it to tidy up)", lock.name)
    return stale


def _lock_owner(lock: Path, st: os.stat_result) -> tuple[str, int] | None:
    """(host, pid) of the editor holding a lock: emacs's link target, or vim's and nano's swap header."""
    try:
        if stat.S_ISLNK(st.st_mode):
            m = re.fullmatch(r"[^@]*@(?P<host>[^.:]+)[^.:]*\.(?P<pid>\d+)(?::.*)?", os.readlink(lock))
            return (m.group("host"), int(m.group("pid"))) if m else None
        with open(lock, "rb") as f:
            head = f.read(108)
    except OSError:
        return None
    if len(head) < 108 or not (head.startswith(b"b0VIM") or head.startswith(b"b0nano")):
        return None
    pid = int.from_bytes(head[24:28], "little")  # vim's block 0: b0_pid, stored lowest byte first
    host = head[68:108].split(b"\0", 1)[0].decode("utf-8", "replace")
    return (host, pid) if pid else None


def is_task_name(name: str) -> bool:
    return not is_ignored(name) and name.lower().endswith(TASK_SUFFIXES)


def writer_open(path: Path) -> bool | None:
    """Whether any process holds the file open for writing (Linux leases); None if unknown.

    A read lease is refused with EAGAIN while a writer has the file open, which
    tells a finished `cp` or editor save from one still in progress without guessing
    from timestamps.
    """
    if not hasattr(fcntl, "F_SETLEASE"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as e:
        return True if e.errno in (errno.EAGAIN, errno.EBUSY) else None
    finally:
        os.close(fd)


def is_settled(path: Path, st: os.stat_result, settle_s: float = DEFAULT_SETTLE_S) -> bool:
    """A regular file is complete when no writer has it open (or, where that is unknown, it has been quiet)."""
    open_for_write = writer_open(path)
    if open_for_write is not None:
        return not open_for_write
    return time.time() - st.st_mtime >= settle_s


def _in_flux(st: os.stat_result, *, synced: bool) -> bool:
    """Whether a closed file is still being put in place: its inode changed within the settle time, and it has
    a second link (a writer's link-then-unlink may be under way) or the spool is synced. A sync tool renames a
    pulled file into place and only then sets its time (Syncthing does, in that order), and that time is part
    of the id every host gives the file: taken in between, it would be a second task."""
    return (st.st_nlink > 1 or synced) and time.time() - st.st_ctime < DEFAULT_SETTLE_S


@dataclass
class IntakeReport:
    queued: list[str]
    failed: list[str]
    pending: list[str]  # not yet complete; look again soon
    more: bool = False  # stopped at the batch limit: more files wait
    editing: list[str] = field(default_factory=list)  # open in an editor: taken once its lock or swap file goes
    listing: spool.QueuedListing | None = None  # queued/ as this scan listed it (the dispatch may reuse it)
    pending_queued: bool = False  # a foreign file in queued/ is among the pending (only a full scan looks there)


def scan(sp: Spool, *, default_model: str, max_bytes: int, include_queued: bool = True,
         limit: int | None = None, settings: Settings | None = None,
         mine: Callable[[str], bool] | None = None, announce: Callable[[str], None] | None = None) -> IntakeReport:
    """Take complete files from inbox/ (and, when asked, foreign files from queued/) into the queue.

    At most `limit` a call: a corpus of 100,000 dropped files is taken in batches, and the
    daemon starts tasks between them instead of after the last one. With `settings`, the names a
    task uses (profile, schema file, the task it continues) are checked too. With `mine` (a synced
    spool), only the files this host owns are taken, each with an id every host would give it. `announce` hears
    each queued/ name just before it appears (the daemon's watcher: its own intake is no news).
    """
    report = IntakeReport([], [], [])
    for state in ("inbox", "queued") if include_queued else ("inbox",):
        base = sp.dir(state)
        if state == "queued":  # only what is no task's: a deep queue is matched, not parsed (its listing is kept)
            report.listing = spool.list_queued(sp)
            listing, present = [n for n in report.listing.unparsed if not leftover(base, n)], set()
        else:
            listing = sorted(os.listdir(base))
            present = set(listing)
        names = [n for n in listing if mine is None or mine(f"{state}/{n}")]
        taken: list[Taken] = []
        waiting = len(report.pending)
        try:
            for n in names:
                if limit is not None and len(report.queued) + len(report.failed) + len(taken) >= limit:
                    report.more = True
                    break
                t = take_one(sp, base / n, report, present, stable=mine is not None)
                if t:
                    taken.append(t)
        except BaseException:  # the claims so far stay for recovery (ours: at the next turn); their locks go now
            for t in taken:
                if t.held is not None:
                    os.close(t.held)
            raise
        if state == "queued" and len(report.pending) > waiting:
            report.pending_queued = True
        if taken:
            _queue_taken(sp, base, taken, report, default_model=default_model, max_bytes=max_bytes, settings=settings,
                         announce=announce)
        if report.more:
            break
    return report


@dataclass
class Taken:
    """A dropped entry moved into tmp/ under our name: ours alone now, not yet queued."""

    claimed: Path
    original: Path
    task_id: str
    name: str  # as shown to the user
    mode: int
    held: int | None = None  # a synced spool's claim is a link: the flock on the file, until its inbox name goes
    signature: transitions.Signature | None = None  # the linked file's size and mtime when it was taken


def leftover(directory: Path, name: str) -> bool:
    """A sync tool's conflict copy or temp file in queued/: reported by `status`, never a new task."""
    return bool(among(directory, [name]))


def take_one(sp: Spool, path: Path, report: IntakeReport, present: set[str] | None = None, *,
             stable: bool = False) -> Taken | None:
    """Claim one complete dropped entry (the caller syncs the claims of a scan together).

    `present`: the names in its directory, to see an editor's lock or swap file beside it for free."""
    name = path.name
    if is_ignored(name):
        return None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    regular = stat.S_ISREG(st.st_mode)
    if regular and not is_task_name(name):
        return None  # not a task (a PDF, an image): left where the user put it; `status` lists it
    if present and locked_by_editor(path.parent, name, present, sp.local.reported):
        report.editing.append(name)
        return None
    if regular and (_in_flux(st, synced=stable) or not is_settled(path, st)):  # (the cheap look first)
        report.pending.append(name)  # still being written, or being put in place: look again soon
        return None
    task_id = spool.new_id(Path(name).stem)
    if stable and regular:
        same, late_copy = _stable_id(sp, path, name, st)
        if late_copy:  # a sync tool's late copy of a file already taken in and answered: not a new drop
            path.unlink(missing_ok=True)
            log.info("dropped a late copy of %s: it was taken in as %s, which has finished", name, same)
            return None
        task_id = same or task_id
    held = signature = None
    if stable and regular:  # a synced spool: the inbox name stays (for every host) until the task is queued
        linked = transitions.link_intake(sp, path, task_id)
        claimed, held, signature = linked if linked else (None, None, None)
        if claimed is not None and _changed_since(claimed, held, signature, st):
            transitions.unclaim_intake(sp, claimed, path, held)  # its id was made from what it was: look again
            if held is not None:
                os.close(held)
            report.pending.append(name)
            return None
    else:
        claimed = transitions.claim_intake(sp, path, task_id)
    if claimed is None:
        return None  # another daemon took it first
    shown = os.fsencode(name).decode("utf-8", "replace")  # a name that is not UTF-8 still gets a readable source
    return Taken(claimed, path, task_id, shown, st.st_mode, held, signature)


def _changed_since(claimed: Path, held: int | None, signature: transitions.Signature | None,
                   st: os.stat_result) -> bool:
    """Whether a synced file's size or time changed between the look its id was made from and its claim (a link,
    whose signature was taken after linking; or, where no link could be made, a rename)."""
    if held is None:
        try:
            moved = os.lstat(claimed)
        except OSError:
            return False
        signature = (moved.st_size, moved.st_mtime_ns)
    return signature != (st.st_size, st.st_mtime_ns)


def _stable_id(sp: Spool, path: Path, name: str, st: os.stat_result) -> tuple[str | None, bool]:
    """On a synced spool, the id every host gives this dropped file: its time in whole seconds (what every sync
    tool keeps of a file's time) and a hash of its name, size, time and bytes; and whether the file is a late
    copy of one that was taken in as that id and has finished.

    When a task of that id finished, the file's arrival here decides, both on this host's clock: a file that
    was here before the finished task arrived is the sync tool's late copy of the original drop (its deletion
    had not reached us yet); one that came after is the same file dropped again, a new task (None: a fresh id).
    """
    secs = st.st_mtime_ns // 1_000_000_000
    try:
        data = spool.read_bytes(path, limit=MAX_HASHED)
    except OSError:
        return None, False
    task_id = spool.new_id(Path(name).stem, datetime.fromtimestamp(secs, UTC),
                           of=b"\0".join([os.fsencode(name), b"%d" % st.st_size, b"%d" % secs, data]))
    if any(e.task_id == task_id for e in spool.list_running(sp)):
        return task_id, True  # taken in and running: its inbox name came back (a power cut undid its removal)
    finished = spool.find_finished(sp, task_id)
    if finished is None:
        return task_id, False
    try:
        late = st.st_ctime <= os.stat(finished.path).st_ctime
    except OSError:
        late = False
    return (task_id, True) if late else (None, False)


def _queue_taken(sp: Spool, base: Path, taken: list[Taken], report: IntakeReport, *, default_model: str,
                 max_bytes: int, settings: Settings | None = None,
                 announce: Callable[[str], None] | None = None) -> None:
    """Queue a scan's claimed entries with one fsync per directory for all of them, not per entry.

    Order: each queued copy is written into tmp/ (its bytes fsynced, invisible), then the claims are made
    durable, then the copies are linked into queued/ and queued/ is synced, and only then are the claimed
    originals removed: a power cut at any point leaves each task in tmp/ (recovery returns it to inbox/),
    queued, or both (recovery drops the copy). A linked claim (a synced spool) keeps its inbox name until then
    too: a kill leaves the file there. On a journaled filesystem the first copy's fsync commits the claims'
    renames with it, so that their directories' fsyncs find nothing left: a drop costs one commit fewer.
    """
    accepted: list[Taken] = []
    settled: set[int] = set()  # (ids of) those queued or rejected: a linked one's inbox name goes
    staged: dict[int, Path] = {}  # (ids of) taken entries -> their queued copy, written but not yet queued
    done = 0
    try:
        try:
            checked = [(t, _check(sp, t, default_model=default_model, max_bytes=max_bytes, settings=settings))
                       for t in taken]
            for t, verdict in checked:
                if isinstance(verdict, Task):
                    staged[id(t)] = spool.stage(sp, render_task(verdict))
            spool.fsync_dir(sp.dir("tmp"), sp)
            spool.fsync_dir(base, sp)
            for t, verdict in checked:
                if isinstance(verdict, str):
                    transitions.reject_intake(sp, t.claimed, t.task_id, t.name, verdict)
                    report.failed.append(t.task_id)
                else:
                    _accept(sp, t, verdict, staged.pop(id(t)), report, announce)
                    accepted.append(t)
                settled.add(id(t))
                done += 1
        except OSError:  # the spool cannot be written: leave the files where the user put them
            for rest in taken[done:]:
                transitions.unclaim_intake(sp, rest.claimed, rest.original, rest.held)
            raise
    finally:
        durable = True
        try:
            for copy in staged.values():  # written, never queued (an error): nothing was promised
                with contextlib.suppress(OSError):
                    copy.unlink(missing_ok=True)
            if accepted:
                durable = False
                spool.fsync_dir(sp.dir("queued"), sp)
                durable = True
                for t in accepted:
                    transitions.drop_intake_copy(t.claimed)
        finally:
            for t in taken:
                if t.held is not None:
                    if id(t) in settled and durable:
                        transitions.release_original(t.original, t.held, t.signature)
                    else:
                        os.close(t.held)  # not settled, or not durable: the name is kept, the link left for recovery


MAX_HASHED = 1024 * 1024  # bytes of a dropped file its stable id hashes (max_bytes' default: all of a task)


def _check(sp: Spool, t: Taken, *, default_model: str, max_bytes: int, settings: Settings | None = None) -> Task | str:
    """One taken entry read as a task, or what is wrong with it (it is moved aside with that message)."""
    if not stat.S_ISREG(t.mode):
        return f"{t.name!r} is a {_kind(t.mode)}, not a file; spoold never follows or reads it"
    if _linked_elsewhere(sp, t):
        return (f"{t.name!r} is a hard link to a file elsewhere; spoold reads only files of its own: copy it into "
                "inbox/ instead")
    try:
        task = read_dropped(t.claimed, task_id=t.task_id, source=t.name, default_model=default_model,
                            max_bytes=max_bytes)
        if settings is not None:
            options.resolve(sp, settings, task)
    except BadInput as e:
        return f"{t.name}: {e}"
    return task


def _accept(sp: Spool, t: Taken, task: Task, staged: Path, report: IntakeReport,
            announce: Callable[[str], None] | None = None) -> None:
    """Queue one checked task from its written copy (its claimed copy can go once queued/ is synced)."""
    def queue(staged: Path | None = None) -> None:
        if announce is not None:
            announce(spool.queued_path_for(sp, task.id, task.priority, task.not_before).name)
        transitions.accept_intake(sp, task, staged=staged)

    try:
        queue(staged)
    except FileExistsError:  # a synced spool: another host took the same file in first, or a different one
        if not transitions.same_queued(sp, task):
            task.id = spool.new_id(Path(t.name).stem)
            task.submitted_at = spool.id_time(task.id)
            queue()
    report.queued.append(task.id)


def _linked_elsewhere(sp: Spool, t: Taken) -> bool:
    """Whether the taken file has a hard link outside the spool's own: its inbox name and intake links."""
    st = os.lstat(t.claimed)
    if st.st_nlink <= (1 if t.held is None else 2):
        return False
    if t.held is None:
        return True
    # the inbox name, and ours and dead daemons' intake links (these wait in tmp/ for recovery)
    return st.st_nlink > 1 + spool.links_in(sp.dir("tmp"), st, spool.INTAKE_PREFIX)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    return "special file"


def read_dropped(path: Path, *, task_id: str, source: str, default_model: str, max_bytes: int) -> Task:
    """Parse a claimed dropped file; BadInput says what to fix."""
    try:
        data = spool.read_bytes(path, limit=max_bytes)
    except OSError as e:
        raise BadInput(f"cannot read the file ({e.strerror})") from None
    if len(data) > max_bytes:
        size = os.lstat(path).st_size
        raise BadInput(f"the file is {size:,} bytes; the limit is {max_bytes:,} (setting max_bytes)")
    if b"\0" in data:
        raise BadInput("the file contains NUL bytes; it looks binary, not a text prompt")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise BadInput(f"the file is not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8", line) from None
    try:
        task = parse_user_task(text, task_id=task_id, default_model=default_model)
    except (TypeError, ValueError, RecursionError) as e:  # a shape no rule foresaw: still the file's fault, not ours
        raise BadInput(f"the frontmatter has a value spoold cannot use ({type(e).__name__}: {str(e)[:200]})") from None
    task.source, task.submitted_at = source, spool.id_time(task_id)
    return task


def waiting_files(sp: Spool) -> list[str]:
    """Inbox files that will become tasks once a daemon takes them in (shown by `ls`: they have no id yet)."""
    return sorted(n for n in os.listdir(sp.dir("inbox")) if is_task_name(n))


def ignored_files(sp: Spool) -> list[str]:
    """Visible inbox files spoold leaves alone because they are not tasks (shown by `status`)."""
    out = []
    for name in sorted(os.listdir(sp.dir("inbox"))):
        if not is_ignored(name) and not is_task_name(name):
            out.append(name)
    return out
