"""The spool format: directories, ids, file names, and the atomic write and moves.

This is the only module that builds a path into the spool. States are
directories and every transition is one rename; every new file is written
maildir-style (tmp/ + fsync + no-clobber link + directory fsync).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import heapq
import operator
import os
import re
import signal
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

from spoold import durability, libc
from spoold.errors import BadTaskId, SpoolError, TaskNotFound

STATES = ("inbox", "tmp", "queued", "running", "done", "failed", "cancelled")
PRIORITIES = {"urgent": 0, "high": 1, "normal": 2, "low": 3}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}
TERMINAL = ("done", "failed", "cancelled")
PENDING = ("queued", "running")
TASK_STATES = ("running", "queued", *TERMINAL)  # a task's states, in the order listings show them
COUNTED = ("inbox", "queued", "running", *TERMINAL)  # what `status` counts

ID_RE = re.compile(r"^\d{8}T\d{9}Z-[a-z2-7]{6}(?:-[a-z0-9][a-z0-9-]{0,39})?$")
NO_TIME = "00000000T000000Z"
_QUEUED_RE = re.compile(r"^([0-3])\.(\d{8}T\d{6}Z)\.(" + ID_RE.pattern[1:-1] + r")\.md$")  # the id checked in the same pass
_STAMP_MS = r"\d{8}T\d{9}Z"  # YYYYmmddTHHMMSSfffZ, as in ids
_RUNNING_RE = re.compile(r"^(" + ID_RE.pattern[1:-1] + r")\.(\d{1,6})\.(" + _STAMP_MS + r")@([A-Za-z0-9-]+)-(\d+)\.md$")
_RECORD_RE = re.compile(r"^(\d{1,6})\.(requeued|retried|waited)(?:\.(" + _STAMP_MS + r"))?@([A-Za-z0-9-]+-\d+)\.(?:json|md)$")
FORMAT = 2  # the spool format this spoold writes; `.spoold/format` says which one a spool is in
_DATE_DIR_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass
class Local:
    """What one process keeps in memory for a spool it works on: a lock its threads queue on before the
    ledger's flock (filelock would make them poll it every 50 ms), run times not yet written to the ledger,
    editor locks already reported. Held by the Spool object, so the library keeps no module-level state."""

    threads: threading.Lock = field(default_factory=threading.Lock)
    unsaved_lock: threading.Lock = field(default_factory=threading.Lock)  # a finish must not wait for a claim's fsyncs
    unsaved: list[float] = field(default_factory=list)
    reported: set[str] = field(default_factory=set)
    peers: bool = False  # other hosts serve this spool over a sync tool: finishes look for an answer from elsewhere
    batch: bool = False  # `durability: batch`: this process skips its fsyncs; `commit` makes them up, for many at once
    dirty: bool = False  # something was written, not yet flushed, since the last commit
    census_stamp: tuple[int, int, int] | None = None  # the queued/ listing whose census we last wrote
    dirs: dict[str, Path] = field(default_factory=dict)  # Spool.dir's paths, made once
    in_touch_until: float = float("inf")  # until when our view vouches that no other host can be running our tasks
    ledger_lock: Any = None  # the ledger's lock file, open between takes: (fd, its path, its closer), or "filelock"
    ledgers: dict[str, tuple[bytes, Any]] = field(default_factory=dict)  # host files read: their bytes, their parse
    floats: dict[str, tuple[list[float], list[str]]] = field(default_factory=dict)  # our ledger's last floats, as text


@dataclass(frozen=True)
class Spool:
    """A spool rooted at `root`; the directories are the truth."""

    root: Path
    local: Local = field(default_factory=Local, compare=False, repr=False, hash=False)

    def dir(self, state: str) -> Path:
        """A state directory; kept, since a task's way through the daemon asks for one some thirty times."""
        d = self.local.dirs.get(state)
        if d is None:
            d = self.local.dirs[state] = self.root / state
        return d

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_dir(self) -> Path:
        """Private daemon state: ledger, locks, the backend's working directory."""
        return self.root / ".spoold"


def open_spool(root: Path | str, create: bool = True) -> Spool:
    """Return the spool at root, creating missing directories (0700) when asked."""
    sp = Spool(Path(root).expanduser().absolute())
    fresh = create and not sp.dir("queued").is_dir()  # a spool made now: in this format from the start
    if create:
        try:
            for d in (sp.root, *(sp.dir(s) for s in STATES), sp.state_dir):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:  # a file in the way, no such place, no permission: the user's to fix, in one line
            why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
            raise SpoolError(f"cannot make a spool at {sp.root}: {why} ({e.filename}); pass --spool DIR "
                             "or set SPOOLD_DIR to a directory of your own") from None
    elif not sp.dir("queued").is_dir():
        raise SpoolError(f"no spool at {sp.root}: run `spoold init` (or pass --spool)")
    else:  # an empty directory a copy or a sync tool did not bring along (git keeps none) is made again
        for d in (*(sp.dir(s) for s in STATES), sp.state_dir):
            if not d.exists() and not d.is_symlink():
                d.mkdir(mode=0o700, exist_ok=True)
    check_private(sp.root)
    for d in (*(sp.dir(s) for s in STATES), sp.state_dir):
        if d.is_symlink():  # a rename out of it would leave the spool, or fail halfway across filesystems
            raise SpoolError(f"{d} is a symbolic link; keep every spool directory inside {sp.root} (link the spool itself)")
        if d.exists():
            check_private(d)
    fmt = read_format(sp)
    if fmt is not None and fmt > FORMAT:
        raise SpoolError(f"{sp.root} is in spool format {fmt}, made by a newer spoold; upgrade spoold to use it")
    if fmt is None and fresh:
        with contextlib.suppress(FileExistsError):  # another process made it at the same moment
            write_new(sp, format_path(sp), f"{FORMAT}\n".encode())
    return sp


def needs_migration(sp: Spool) -> bool:
    """A spool spoold 1 made (no `.spoold/format`), even an empty one (its daemon may still serve it):
    spoold.migrate brings it to this format."""
    return read_format(sp) is None


def check_private(root: Path) -> None:
    """Refuse a spool another user owns or anyone may write to: it would run their prompts."""
    st = root.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise SpoolError(f"spool {root} is owned by another user (uid {st.st_uid}); use your own spool")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SpoolError(f"spool {root} is writable by others; run `chmod 700 {root}`")


# ---- ids and names -------------------------------------------------------------


def slugify(text: str, limit: int = 40) -> str:
    """Lower-case ascii words joined by dashes; readable part of an id."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = ""
    for w in words:
        nxt = f"{out}-{w}" if out else w
        if len(nxt) > limit:
            break
        out = nxt
    return out


class _IdClock:
    """Wall time in ms, but never the same or earlier than this process's last id: FIFO within a process.
    The one process-wide state in the library, because that promise is about the process."""

    def __init__(self) -> None:
        self._lock, self._last_ms = threading.Lock(), 0

    def now(self) -> datetime:
        with self._lock:
            ms = self._last_ms = max(time.time_ns() // 1_000_000, self._last_ms + 1)
        return datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)


_monotonic_now = _IdClock().now


def new_id(hint: str = "", now: datetime | None = None, *, of: bytes | None = None) -> str:
    """A unique, time-sortable, filesystem-safe id with a readable slug.

    Millisecond UTC time first (sorts by submission), 30 random bits (unique
    across processes and machines), then a slug of the hint. With `of` (what identifies a dropped
    file on a synced spool), the bits are its hash instead, so two hosts taking the same file in make
    the same id, and the same bytes: the sync tool sees one file, never two tasks.
    """
    if now is None:
        now = _monotonic_now()
    now = now.astimezone(UTC)
    stamp = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"
    if of is None:
        bits = os.urandom(5)
    else:
        import hashlib  # lazy: loading OpenSSL costs a submit ~3 ms, and only intake on a synced spool hashes

        bits = hashlib.blake2b(of, digest_size=5).digest()
    rand = base64.b32encode(bits).decode().lower()[:6]
    slug = slugify(hint)
    return f"{stamp}-{rand}-{slug}" if slug else f"{stamp}-{rand}"


def check_id(task_id: str) -> str:
    """Validate an id before it touches a path: no separators, dots or NUL can pass."""
    if not isinstance(task_id, str) or not ID_RE.fullmatch(task_id):  # fullmatch: `$` alone lets "id\n" in
        raise BadTaskId(f"not a task id: {task_id[:80]!r}" if isinstance(task_id, str) else "task id must be text")
    return task_id


def id_time(task_id: str) -> datetime:
    """The submission time encoded in an id."""
    return _stamp(task_id[:15]).replace(microsecond=int(task_id[15:18]) * 1000)


def _stamp(s: str) -> datetime:
    """`YYYYmmddTHHMMSS` as UTC; by hand because strptime costs a `spoold submit` its _strptime import."""
    return datetime(int(s[:4]), int(s[4:6]), int(s[6:8]), int(s[9:11]), int(s[11:13]), int(s[13:15]), tzinfo=UTC)


@dataclass(frozen=True, slots=True)  # slots: a 100,000-task listing holds one per task
class QueuedEntry:
    """What a queued file name says: dispatch order without opening the file."""

    name: str
    priority: int
    not_before: datetime | None
    task_id: str


def queued_name(task_id: str, priority: str, not_before: datetime | None) -> str:
    """`P.NOTBEFORE.ID.md`: names sort in dispatch order (priority, not_before, submission)."""
    nb = not_before.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ") if not_before else NO_TIME
    return f"{PRIORITIES[priority]}.{nb}.{task_id}.md"


# The fields of a queued name `P.NOTBEFORE.ID.md` sit at fixed offsets (P one digit, NOTBEFORE 16
# characters): a listing of 100,000 names reads them by slicing, ~10x faster than the regex.
_ID_SORT_PART = operator.itemgetter(slice(19, 45))  # a queued name's id, its time and random part: what orders ids


def queued_id(name: str) -> str:
    """The task id in a valid queued name."""
    return name[19:-3]


def untimed(name: str) -> bool:
    """A valid queued name with no not_before."""
    return name[2:18] == NO_TIME


def is_queued_name(name: str) -> bool:
    """A queued task's name: its shape in one regex match, its time checked only where it has one (most have
    none), never parsed further; a listing of a million names asks this of each."""
    return _QUEUED_RE.match(name) is not None and (untimed(name) or parse_queued_name(name) is not None)


def parse_queued_name(name: str) -> QueuedEntry | None:
    m = _QUEUED_RE.match(name)
    if not m:
        return None
    try:
        nb = None if m.group(2) == NO_TIME else _stamp(m.group(2))
    except ValueError:  # `20261399T...`: the shape of a queued name but no real time; not ours
        return None
    return QueuedEntry(name, int(m.group(1)), nb, m.group(3))


HOST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


def legacy_host() -> str:
    """The bare host name spool format 1 used as a host's id (two laptops called MacBook-Pro collided)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", os.uname().nodename) or "host"


def host_id_file() -> Path:
    """Where this installation keeps its host id: outside the spool, which other hosts may share."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "spoold" / "host_id"


@functools.cache
def host_id() -> str:
    """This host's id in the spool's names: `$SPOOLD_HOST_ID`, else one generated once per installation
    (`HOSTNAME-xxxxxx`) and kept in host_id_file(). Never in the spool's config.yaml: a synced spool
    would give every host the same one."""
    chosen = os.environ.get("SPOOLD_HOST_ID")
    if chosen:
        if not HOST_ID_RE.match(chosen) or chosen.rpartition("-")[2].isdigit():
            raise SpoolError(f"SPOOLD_HOST_ID={chosen!r} must be letters, digits and dashes, not ending in -NUMBER")
        return chosen
    path = host_id_file()
    try:
        kept = path.read_text(encoding="utf-8").strip()
        if HOST_ID_RE.match(kept):
            return kept
    except (OSError, UnicodeDecodeError):
        pass
    made = f"{slugify(legacy_host(), 40) or 'host'}-{base64.b32encode(os.urandom(5)).decode().lower()[:6]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".host_id.{os.getpid()}.tmp")
        staged.write_text(made + "\n", encoding="utf-8")
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(staged, path)  # the first process to get here decides; the rest read its id
        except FileExistsError:
            made = path.read_text(encoding="utf-8").strip() or made
        finally:
            staged.unlink(missing_ok=True)
    except OSError:
        return legacy_host()  # a read-only home: the host name, as every process here will also find
    return made


def owner_tag() -> str:
    """`host-pid` of this process, as it appears in running/ names (asked per file written: remembered per pid)."""
    return _owner_of(os.getpid())


@functools.cache
def _owner_of(pid: int) -> str:
    return f"{host_id()}-{pid}"


@dataclass(frozen=True)
class RunningEntry:
    """What a running/ name says: `ID.N.STARTED@HOST-PID.md`, the task, its attempt, when it started, who runs it."""

    name: str
    task_id: str
    attempt: int  # counted over the task's whole life (a retry does not reset it; see retry_base)
    started: datetime
    host: str
    pid: int

    @property
    def owner(self) -> str:
        """`host-pid`: the process that claimed it, as in owner locks and staging names."""
        return f"{self.host}-{self.pid}"


def stamp_ms(when: datetime) -> str:
    """`YYYYmmddTHHMMSSfffZ` (UTC, milliseconds): a time inside a file name."""
    w = when.astimezone(UTC)
    return w.strftime("%Y%m%dT%H%M%S") + f"{w.microsecond // 1000:03d}Z"


def _parse_stamp_ms(s: str) -> datetime:
    return _stamp(s[:15]).replace(microsecond=int(s[15:18]) * 1000)


def owner_host(owner: str) -> str:
    """The host part of `host-pid` (a host name may hold dashes; a pid never does)."""
    return owner.rpartition("-")[0]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists here (one we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_pid(owner: str) -> int | None:
    pid = owner.rpartition("-")[2]
    return int(pid) if pid.isdigit() else None


def parse_running_name(name: str) -> RunningEntry | None:
    m = _RUNNING_RE.match(name)
    if not m:
        return None
    try:
        started = _parse_stamp_ms(m.group(3))
    except ValueError:
        return None
    return RunningEntry(name, m.group(1), int(m.group(2)), started, m.group(4), int(m.group(5)))


def date_dir(sp: Spool, state: str, when: datetime) -> Path:
    """done/ is partitioned by finish date so no listing grows without bound."""
    return sp.dir(state) / when.astimezone(UTC).strftime("%Y-%m-%d")


# ---- atomic writes and moves ---------------------------------------------------

_FAULT = os.environ.get("SPOOLD_FAULT")  # `point:N`: the crash tests' kill -9 at the Nth pass of a point
_fault_hits: dict[str, int] = {}


def fault(point: str) -> None:
    """Test hook, as SQLite has: with SPOOLD_FAULT=point:N, SIGKILL this process the Nth time it passes point."""
    if _FAULT is None:
        return
    name, _, nth = _FAULT.rpartition(":")
    if point == name or name == "*":
        _fault_hits[name] = _fault_hits.get(name, 0) + 1
        if _fault_hits[name] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)



def make_dir(path: Path) -> None:
    """Create a directory (0700) durably: its parent is fsynced, so a power cut cannot drop it with what it holds."""
    if not path.parent.is_dir():
        make_dir(path.parent)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return
    fsync_dir(path.parent)


def fsync_dir(path: Path, sp: Spool | None = None) -> None:
    """Make a directory's names durable now, or, under group commit (`sp.local.batch`), at the next commit."""
    if sp is not None and sp.local.batch:
        sp.local.dirty = True
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tmp(sp: Spool, data: bytes) -> Path:
    tmp = sp.dir("tmp") / f"{owner_tag()}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
            fault("write:partial")
        if sp.local.batch:
            durability.start_writeback(fd)
            sp.local.dirty = True
        else:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def links_in(directory: Path, st: os.stat_result, prefix: str = "") -> int:
    """How many names in `directory` (starting with `prefix`) are links to the file `st` is of."""
    found = 0
    for name in os.listdir(directory):
        if name.startswith(prefix):
            with contextlib.suppress(OSError):
                found += same_file(os.lstat(directory / name), st)
    return found


def stage(sp: Spool, data: bytes) -> Path:
    """A new file's bytes written into tmp/ (fsynced) ahead of time; write_new(staged=) puts it in place."""
    return _write_tmp(sp, data)


def write_new(sp: Spool, dest: Path, data: bytes = b"", *, sync_dir: bool = True, staged: Path | None = None) -> Path:
    """Write a new file at dest; never overwrite (FileExistsError if dest exists). `staged`: its bytes were
    written by stage (the file is removed from tmp/ whatever happens).

    sync_dir=False leaves the directory fsync to the caller, who batches it for many files.
    """
    if not dest.parent.is_dir():
        make_dir(dest.parent)
    tmp = _write_tmp(sp, data) if staged is None else staged
    fault("write:staged")
    try:
        os.link(tmp, dest)  # link() fails rather than clobber: the no-overwrite rule
        fault("write:linked")
    finally:
        tmp.unlink(missing_ok=True)
    if sync_dir:
        fsync_dir(dest.parent, sp)
    return dest


def rewrite(sp: Spool, path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Atomically replace a file this process owns (it sits under our claim).

    sync_dir=False when a move of the same file follows at once: the move's fsync of its
    new directory makes the name durable, with whichever content it has then (the new one).
    """
    tmp = _write_tmp(sp, data)
    fault("rewrite:staged")
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent, sp)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100




def rename_noreplace(src: Path, dest: Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing dest.

    By hand because Python exposes no RENAME_NOREPLACE; where the kernel or
    filesystem lacks it, a check-then-rename is the fallback (ids are unique,
    so the window only matters for foreign files).
    """
    renameat2 = libc.function("renameat2")
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE) == 0:
            return
        err = libc.last_errno()
        if err == errno.ENOENT:
            raise FileNotFoundError(err, os.strerror(err), str(src))
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dest))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dest))
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(errno.EEXIST, "destination exists", str(dest))
    os.rename(src, dest)


def move(src: Path, dest: Path, *, sync: str = "both", sp: Spool | None = None) -> Path:
    """One transition: rename src to dest, whose name is unique by task id.

    Raises FileNotFoundError when src is gone (another process won the race)
    and FileExistsError rather than overwrite a file already at dest. Both
    directories are fsynced: a claim undone by a power cut while the queued
    copy survived would run a task twice. sync="dest" skips the source
    directory where recovery settles a copy a power cut brings back (a
    finished task's running/ copy); sync="none" leaves both to a caller that
    batches them. With `sp` under group commit, both wait for the next commit.
    """
    if not dest.parent.is_dir():
        make_dir(dest.parent)
    fault("move:before")
    rename_noreplace(src, dest)
    fault("move:after")
    if sync != "none":
        fsync_dir(dest.parent, sp)
    if sync == "both" and src.parent != dest.parent:
        fsync_dir(src.parent, sp)
    return dest


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    """Read a regular file without following a symlink, at most limit+1 bytes."""
    return read_file(path, limit)[0]


def read_file(path: Path, limit: int | None = None) -> tuple[bytes, os.stat_result]:
    """read_bytes, with the stat of the very file read (its inode tells whether it was replaced since)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return (f.read() if limit is None else f.read(limit + 1)), st
    finally:
        os.close(fd)


# ---- listing and lookup --------------------------------------------------------


class QueuedListing(Sequence[QueuedEntry]):
    """queued/ in dispatch order, from names alone; a name is parsed only when its entry is read.

    A daemon or `spoold status` over 100,000 queued tasks needs the count and the first few;
    parsing every name cost ~0.35 s, sorting the names costs ~0.03 s.
    """

    __slots__ = ("_entries", "_names", "_sorted", "seconds", "stamp", "unparsed")

    def __init__(self, names: list[str], unparsed: list[str] | None = None,
                 stamp: tuple[int, int, int] | None = None, *, ordered: bool = True) -> None:
        self._names = names  # valid queued names; sorted unless `ordered` is False (then sorted when first read)
        self._sorted = ordered
        self.unparsed = unparsed or []  # the directory's other names: foreign files, sync tools' leftovers
        self.stamp = stamp  # queued/'s dir_stamp just before it was listed (see spoold.census)
        self.seconds = 0.0  # what listing (and checking and sorting) the directory took
        self._entries: list[QueuedEntry | None] = [None] * len(names)

    @property
    def names(self) -> list[str]:
        """The names in dispatch order (a million take half a second to sort: only when asked)."""
        if not self._sorted:
            self._names.sort()
            self._sorted = True
        return self._names

    @property
    def ordered(self) -> bool:
        return self._sorted

    def __len__(self) -> int:
        return len(self._names)

    @overload
    def __getitem__(self, i: int) -> QueuedEntry: ...
    @overload
    def __getitem__(self, i: slice) -> list[QueuedEntry]: ...
    def __getitem__(self, i: int | slice) -> QueuedEntry | list[QueuedEntry]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self.names)))]
        e = self._entries[i]
        if e is None:
            n = self.names[i]  # checked when listed; most carry no time, and then slicing is the parse
            e = QueuedEntry(n, int(n[0]), None, queued_id(n)) if untimed(n) else parse_queued_name(n)
            self._entries[i] = e
        return e  # type: ignore[return-value]

    def index_of(self, task_id: str) -> int | None:
        """Position of a task, by name alone."""
        suffix = f".{task_id}.md"
        return next((i for i, n in enumerate(self.names) if n.endswith(suffix)), None)

    def first_names(self, limit: int | None) -> list[str]:
        """The first `limit` names in dispatch order (a few of an unsorted million: no full sort)."""
        few = not self._sorted and limit is not None and limit <= 64
        return heapq.nsmallest(limit, self._names) if few else self.names[:limit]  # type: ignore[arg-type]

    def untimed_ids(self, limit: int | None = None) -> list[str] | None:
        """The ids of the first `limit` tasks, if none of them has a not_before (else None)."""
        names = self.first_names(limit)
        if not all(untimed(n) for n in names):
            return None
        return [queued_id(n) for n in names]

    def oldest_id(self) -> str | None:
        """The earliest submitted task's id (ids sort by their time and random part, at a fixed offset in the
        name), in any order of the names: compared in C, a million in 0.14 s (0.26 s through queued_id)."""
        first = min(self._names, key=_ID_SORT_PART, default=None)
        return queued_id(first) if first is not None else None

    def timed(self) -> list[QueuedEntry]:
        """Entries with a not_before (the rest of the names say 00000000T000000Z)."""
        return [self[i] for i, n in enumerate(self.names) if not untimed(n)]

    def newest(self, n: int | None) -> list[tuple[str, str]]:
        """(id, name) of the `n` most recently submitted (all with None), by name alone: for listings."""
        pairs = [(queued_id(name), name) for name in self.names]
        return heapq.nlargest(n, pairs) if n is not None else pairs

    def by_id(self, *, reverse: bool = False) -> QueuedListing:
        """The same tasks in submission order (fifo, lifo): ids sort by time, and sit at a fixed offset."""
        return QueuedListing(sorted(self.names, key=queued_id, reverse=reverse))


def list_queued(sp: Spool, trust: Callable[[tuple[int, int, int], int], bool] | None = None) -> QueuedListing:
    """The queue in dispatch order, from names alone (a file with any other name is not queued yet).

    `trust(stamp, count)`: whether a count kept for this very state of queued/ (spoold.census) says that
    all `count` names listed are valid; then they are neither checked nor sorted (`status` over a million)."""
    qdir = sp.dir("queued")
    began = time.monotonic()
    before = os.stat(qdir)
    listed = os.listdir(qdir)
    if trust is not None and trust(dir_stamp(before), len(listed)):
        return QueuedListing(listed, None, stamp=dir_stamp(before), ordered=False)
    names = [n for n in listed if is_queued_name(n)]
    names.sort()
    out = QueuedListing(names, sorted(set(listed) - set(names)) if len(names) != len(listed) else None,
                        stamp=dir_stamp(before))
    out.seconds = time.monotonic() - began
    return out


def dir_stamp(st: os.stat_result) -> tuple[int, int, int]:
    """What tells a directory's listing from any later one: its mtime, its ctime (which no tool can set
    back, as rsync -a or touch set an mtime) and its inode (a directory replaced)."""
    return st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def list_running(sp: Spool) -> list[RunningEntry]:
    entries = (parse_running_name(n) for n in sorted(os.listdir(sp.dir("running"))))
    return [e for e in entries if e]


def date_dirs(sp: Spool, state: str) -> list[Path]:
    """Date partitions of a terminal state, newest first."""
    base = sp.dir(state)
    if not base.is_dir():
        return []
    return sorted((base / n for n in os.listdir(base) if _DATE_DIR_RE.match(n)), reverse=True)


def terminal_dirs(sp: Spool, state: str) -> list[Path]:
    """Where files of a terminal state live: the state dir and its date partitions."""
    return [*date_dirs(sp, state), sp.dir(state)]


@dataclass(frozen=True)
class Located:
    state: str
    path: Path
    task_id: str

    @property
    def result_path(self) -> Path:
        return result_path_for(self.path.parent, self.task_id)


def result_path_for(directory: Path, task_id: str) -> Path:
    return directory / f"{task_id}.result.md"


def task_path_for(directory: Path, task_id: str) -> Path:
    return directory / f"{task_id}.md"


def running_path(sp: Spool, task_id: str, attempt: int, started: datetime, owner: str | None = None) -> Path:
    """`running/ID.N.STARTED@OWNER.md`: a claim is this one rename, and the name carries all it changes."""
    return sp.dir("running") / f"{task_id}.{attempt}.{stamp_ms(started)}@{owner or owner_tag()}.md"


SCHEMAS_DIR = "schemas"  # the owner's JSON Schemas, named by tasks' `schema: NAME.json`


def schema_path(sp: Spool, name: str) -> Path:
    if "/" in name or name.startswith(".") or "\0" in name:
        raise BadTaskId(f"not a schema file name: {name[:80]!r}")
    return sp.root / SCHEMAS_DIR / name


PARTIAL_SUFFIX = ".partial"


# ---- the other names: markers, claims, staging, private state ------------------

CANCEL_SUFFIX = ".cancel"
INTAKE_PREFIX = "intake~"
NAME_MAX = 255  # bytes in one file name on every filesystem spoold supports


def inbox_path(sp: Spool, name: str) -> Path:
    """A dropped file's place, by its name alone (never a path the name could climb out of)."""
    return sp.dir("inbox") / Path(name).name


def queued_path(sp: Spool, name: str) -> Path:
    return sp.dir("queued") / name


def queued_path_for(sp: Spool, task_id: str, priority: str, not_before: datetime | None) -> Path:
    return sp.dir("queued") / queued_name(task_id, priority, not_before)


def running_file(sp: Spool, name: str) -> Path:
    return sp.dir("running") / name


def cancel_marker(sp: Spool, task_id: str) -> Path:
    """`running/ID.cancel`: anyone's request that the task's owner stop it."""
    return sp.dir("running") / f"{task_id}{CANCEL_SUFFIX}"


def parse_cancel_marker(name: str) -> str | None:
    return name[: -len(CANCEL_SUFFIX)] if name.endswith(CANCEL_SUFFIX) else None


def intake_claim_path(sp: Spool, task_id: str, source: str) -> Path:
    """`tmp/intake~OWNER~ID~SOURCE`: a dropped entry taken by OWNER (the source cut from the left to fit)."""
    prefix = f"{INTAKE_PREFIX}{owner_tag()}~{task_id}~"
    room = NAME_MAX - len(prefix.encode())
    return sp.dir("tmp") / (prefix + os.fsdecode(os.fsencode(source)[-room:]))


def parse_intake_claim(name: str) -> tuple[str, str, str] | None:
    """(owner, task id, source name) of an intake claim's name."""
    parts = name.split("~", 3)
    if len(parts) != 4 or parts[0] + "~" != INTAKE_PREFIX:
        return None
    return parts[1], parts[2], parts[3]


PRUNE_PREFIX = "prune~"


def prune_path(sp: Spool, file: Path) -> Path:
    """`tmp/prune~OWNER~NAME`: a finished task's file on its way out; once moved here it is gone from every
    listing, and recovery finishes deleting what a dead pruner left."""
    return sp.dir("tmp") / f"{PRUNE_PREFIX}{owner_tag()}~{file.name}"


def remove_pruned(path: Path) -> bool:
    """Delete what a prune staged: a file, a task's records directory, or a rejected entry (a directory,
    whose links are removed, never followed; or a link, not its target). True once it is gone.

    A dropped directory may hold read-only directories (a copy from read-only media, a module cache): each
    directory of the tree (never a link's target) is made writable by its owner first."""
    try:
        is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True
    if is_dir:
        import shutil  # (not at import: `spoold submit` never needs it)

        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        for top, dirs, _ in os.walk(path):  # each directory made listable before the walk goes into it (`dirs`
            for d in (os.path.join(top, n) for n in dirs):  # holds links to directories too: never chmod'ed)
                with contextlib.suppress(OSError):
                    if stat.S_ISDIR(os.lstat(d).st_mode):
                        os.chmod(d, 0o700)
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    return not os.path.lexists(path)


def parse_prune_name(name: str) -> str | None:
    """The owner of a prune staging name."""
    if not name.startswith(PRUNE_PREFIX):
        return None
    return name[len(PRUNE_PREFIX):].partition("~")[0] or None


def staging_owner(name: str) -> str | None:
    """The owner of a staged write `tmp/OWNER.HEX.tmp` (see _write_tmp)."""
    return name.split(".", 1)[0] if name.endswith(".tmp") and "." in name[:-4] else None


REJECTED_SUFFIX = ".rejected"


def rejected_path(sp: Spool, task_id: str, regular: bool) -> Path:
    """Where bad input goes: `failed/ID.md` for a file, `failed/ID.rejected` for anything else (kept untouched)."""
    return sp.dir("failed") / (f"{task_id}.md" if regular else f"{task_id}{REJECTED_SUFFIX}")


def listed_id(name: str) -> str | None:
    """The task id a terminal directory's entry stands for: `ID.md`, or a rejected `ID.rejected` (a directory or
    link that was dropped: listed and shown by its result, never read or followed)."""
    if name.endswith(".md") and not name.endswith(".result.md"):
        return name[:-3]
    if name.endswith(REJECTED_SUFFIX):
        return name[: -len(REJECTED_SUFFIX)]
    return None


def returned_path(sp: Spool, source: str, task_id: str) -> Path:
    """Where an interrupted intake puts a dropped file back: its own name, else `STEM.recovered-XXXXXX.EXT`."""
    dest = sp.dir("inbox") / source
    if dest.exists():
        dest = sp.dir("inbox") / f"{Path(source).stem}.recovered-{task_id[-6:]}{Path(source).suffix}"
    return dest


def tmp_path(sp: Spool, name: str) -> Path:
    return sp.dir("tmp") / name


def tmp_names(sp: Spool) -> list[str]:
    return os.listdir(sp.dir("tmp"))


def running_names(sp: Spool) -> list[str]:
    return os.listdir(sp.dir("running"))


def owner_lock_path(sp: Spool, owner: str) -> Path:
    """`.spoold/locks/OWNER.lock`: held by a live daemon; its owner's claims are alive while it is held."""
    return sp.state_dir / "locks" / f"{owner}.lock"


def daemon_info_path(sp: Spool, owner: str) -> Path:
    """`.spoold/locks/OWNER.json`: a serving daemon's own word on itself (since when, its flags), beside its lock."""
    return sp.state_dir / "locks" / f"{owner}.json"


def daemon_owners(sp: Spool) -> list[str]:
    """The owners whose daemon-info files are there (live or not: owner liveness decides)."""
    d = sp.state_dir / "locks"
    return sorted(n[:-5] for n in os.listdir(d) if n.endswith(".json")) if d.is_dir() else []


def hosts_dir(sp: Spool) -> Path:
    """`.spoold/hosts/`: one heartbeat per serving daemon, synced, so every host sees who is live."""
    return sp.state_dir / "hosts"


def beat_path(sp: Spool, owner: str) -> Path:
    """`.spoold/hosts/HOST-PID.json`: a daemon's heartbeat, rewritten (tmp + rename) by that daemon alone."""
    return hosts_dir(sp) / f"{owner}.json"


def beat_owners(sp: Spool) -> list[str]:
    d = hosts_dir(sp)
    names = os.listdir(d) if d.is_dir() else []
    return sorted(n[:-5] for n in names if n.endswith(".json") and _OWNER_RE.match(n[:-5]))


_OWNER_RE = re.compile(r"^[A-Za-z0-9-]+-\d+$")


def known_hosts(sp: Spool) -> list[str]:
    """Every host that ever counted a start here (its ledger file stays) or beats now: where host-named
    results may come from."""
    d = ledger_dir(sp)
    counted = {n[:-5] for n in os.listdir(d) if n.endswith(".json") and HOST_ID_RE.match(n[:-5])} if d.is_dir() else set()
    return sorted(counted | {owner_host(o) for o in beat_owners(sp)})


def host_result_path(directory: Path, task_id: str, host: str) -> Path:
    """`ID@HOST.result.md`: a result written by a host that could not rule out another host running the task
    too (a synced spool with a host out of touch); never a sync tool's conflict copy of `ID.result.md`."""
    return directory / f"{task_id}@{host}.result.md"


def answer_path(directory: Path, task_id: str, hosts: Callable[[], list[str]] | None = None) -> Path:
    """The task's answer in one directory: `ID.result.md`, else the first host-named one (by host name);
    every other result of the task there is a duplicate. The canonical path when none exists.

    `hosts` (spool.known_hosts, asked only on a miss) makes a miss a few stats; the directory is
    listed only when none of them wrote one either."""
    canonical = result_path_for(directory, task_id)
    if canonical.exists():
        return canonical
    return next(iter(results_of(directory, task_id, hosts)), canonical)


def results_of(directory: Path, task_id: str, hosts: Callable[[], list[str]] | None = None) -> list[Path]:
    """Every result of a task in one directory, its answer first: `ID.result.md`, then `ID@HOST.result.md`."""
    canonical = result_path_for(directory, task_id)
    found = [canonical] if canonical.exists() else []
    if hosts is not None:  # a few stats; the directory (maybe 100,000 names) is listed only when they find nothing
        named = [p for h in hosts() if (p := host_result_path(directory, task_id, h)).exists()]
        if found or named:
            return found + named
    prefix = f"{task_id}@"
    listed = [n for n in (os.listdir(directory) if directory.is_dir() else [])
              if n.startswith(prefix) and n.endswith(".result.md")]
    by_host = sorted(listed, key=lambda n: n[len(prefix):-len(".result.md")])  # the order the stats above give
    return found + [directory / n for n in by_host]


def count_duplicates(names: list[str]) -> int:
    """Second answers in one directory's listing: every result of a task beyond its first (names alone)."""
    if "@" not in "".join(names):  # usually none: one pass in C over a day's 100,000 names
        return 0
    named = [n for n in names if "@" in n and n.endswith(".result.md")]
    if not named:
        return 0
    answered = {n[: -len(".result.md")] for n in names if n.endswith(".result.md") and "@" not in n}
    per = Counter(n.partition("@")[0] for n in named)
    return sum(c - (tid not in answered) for tid, c in per.items())


def spool_path(sp: Spool, rel: str) -> Path:
    """A path the format names relative to the spool's root (the sync rules' list of what stays local)."""
    return sp.root / rel


def cache_path(sp: Spool, name: str) -> Path:
    """`.spoold/cache/NAME`: what any process may rebuild from the files it stands for (spoold.census's counts,
    config.yaml's parse); never synced."""
    return sp.state_dir / "cache" / name


def config_cache_path(config_path: Path) -> Path | None:
    """Where config.yaml's parse is kept (`.spoold/cache/config.json`); None for a file that is no spool's."""
    sp = Spool(config_path.parent)
    return cache_path(sp, "config.json") if config_path == sp.config_path and sp.state_dir.is_dir() else None


def write_cache(path: Path, value: object) -> None:
    """Replace a cache file (tmp, rename; no fsync: it is rebuilt from what it stands for). A failure is no error:
    the next reader rebuilds it."""
    import json

    tmp = path.with_name(f".{owner_tag()}.{os.urandom(4).hex()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)  # (the config's may hold secrets)
        with open(fd, "wb") as f:
            f.write(json.dumps(value).encode())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def read_cache(path: Path) -> Any:
    """A cache file's value; None when there is none or it cannot be read."""
    import json

    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def ledger_dir(sp: Spool) -> Path:
    return sp.dir(".spoold/ledger")  # (kept like a state's: a claim asks for it a few times)


def ledger_host_file(sp: Spool, host: str) -> Path:
    """`.spoold/ledger/HOST.json`: one host's own account, written by that host alone."""
    return ledger_dir(sp) / f"{host}.json"


def ledger_lock_path(sp: Spool) -> Path:
    return ledger_dir(sp) / ".lock"


def damaged_path(path: Path, when: float) -> Path:
    """A damaged file kept aside, never deleted: `NAME.damaged-EPOCH`."""
    return path.with_name(f"{path.name}.damaged-{int(when)}")


def kept_claim_path(sp: Spool, running_name: str) -> Path:
    """`.spoold/kept/NAME`: a hard link to a claimed task file, local, so that a sync tool deleting our
    running/ copy (another host took the task over) never takes the task's bytes from us. Not in work/:
    that is where tasks run, and a task must not read another's prompt."""
    return kept_dir(sp) / running_name


def kept_dir(sp: Spool) -> Path:
    return sp.state_dir / "kept"


def work_dir(sp: Spool) -> Path:
    """`.spoold/work/`: the neutral working directory tasks run in when their profile names none."""
    return sp.state_dir / "work"


@dataclass(frozen=True)
class AttemptRecord:
    """One write-once record in `.spoold/attempts/ID/`: `N.requeued@OWNER.json` (attempt N ended and the task
    went back to the queue, and why), `N.waited.STAMP@OWNER.json` (claimed for attempt N but sent back
    uncounted: a hold, a wait, a stop; N is used again) or `N.retried.STAMP@OWNER.md` (the result a retry
    after attempt N set aside)."""

    path: Path
    attempt: int
    kind: str  # "waited", "requeued" or "retried", in the order they happen for one N
    owner: str


def attempts_dir(sp: Spool, task_id: str) -> Path:
    return sp.state_dir / "attempts" / check_id(task_id)


def attempts_root(sp: Spool) -> Path:
    return sp.state_dir / "attempts"


def requeued_record_path(sp: Spool, task_id: str, attempt: int) -> Path:
    return attempts_dir(sp, task_id) / f"{attempt}.requeued@{owner_tag()}.json"


def waited_record_path(sp: Spool, task_id: str, attempt: int, when: datetime) -> Path:
    return attempts_dir(sp, task_id) / f"{attempt}.waited.{stamp_ms(when)}@{owner_tag()}.json"


def retried_result_path(sp: Spool, task_id: str, attempt: int, when: datetime) -> Path:
    return attempts_dir(sp, task_id) / f"{attempt}.retried.{stamp_ms(when)}@{owner_tag()}.md"


def attempt_records(sp: Spool, task_id: str) -> list[AttemptRecord]:
    """A task's records, oldest first; none for a task that never went back to the queue (the usual case)."""
    d = attempts_dir(sp, task_id)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = _RECORD_RE.match(n)
        if m:
            out.append(AttemptRecord(d / n, int(m.group(1)), m.group(2), m.group(4)))
    order = {"waited": 0, "requeued": 1, "retried": 2}
    return sorted(out, key=lambda r: (r.attempt, order[r.kind], r.path.name))  # the order they were written in


def last_attempt(records: list[AttemptRecord]) -> int:
    """The highest attempt number the records know of (0 for none)."""
    return max((r.attempt for r in records if r.kind != "waited"), default=0)


def retry_base(records: list[AttemptRecord]) -> int:
    """Attempts made before the latest retry: they do not count against max_attempts."""
    return max((r.attempt for r in records if r.kind == "retried"), default=0)


# ---- notifications: an outbox of events, each delivered by its one owner ------------------

_EVENT_RE = re.compile(r"^([A-Za-z0-9._-]+)@([A-Za-z0-9-]+-\d+)\.json$")
_SENT_RE = re.compile(r"^([A-Za-z0-9._-]+)~([A-Za-z0-9_-]+)\.(sent|failed)$")


def notify_dir(sp: Spool) -> Path:
    return sp.state_dir / "notify"


def event_path(sp: Spool, event_id: str, owner: str | None = None) -> Path:
    """`.spoold/notify/EVENT@OWNER.json`: one event to tell (a task that ended, a hold, a drained queue), written
    once by the process that saw it; that owner delivers it, or a live one on its host after taking it over."""
    return notify_dir(sp) / f"{event_id}@{owner or owner_tag()}.json"


def parse_event_name(name: str) -> tuple[str, str] | None:
    """(event id, owner) of an event file's name."""
    m = _EVENT_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def delivered_path(sp: Spool, event_id: str, target: str, *, failed: bool = False) -> Path:
    """`.spoold/notify/EVENT~TARGET.sent` (or `.failed`, given up): written once, when one target is done with."""
    return notify_dir(sp) / f"{event_id}~{target}.{'failed' if failed else 'sent'}"


def parse_delivered_name(name: str) -> tuple[str, str, str] | None:
    """(event id, target, sent or failed) of a delivery record's name."""
    m = _SENT_RE.match(name)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def notify_health_path(sp: Spool, owner: str | None = None) -> Path:
    """`.spoold/notify/failing@OWNER.health`: the targets this daemon cannot reach now (JSON), rewritten only by it."""
    return notify_dir(sp) / f"failing@{owner or owner_tag()}.health"


def notify_names(sp: Spool) -> list[str]:
    d = notify_dir(sp)
    return os.listdir(d) if d.is_dir() else []


def migrate_lock_path(sp: Spool) -> Path:
    """`.spoold/migrate.lock`: held (flock) by the one process migrating the spool to this format."""
    return sp.state_dir / "migrate.lock"


def lock_owners(sp: Spool) -> list[str]:
    """The owners whose lock files are in `.spoold/locks/` (live or not: owner liveness decides)."""
    d = sp.state_dir / "locks"
    return sorted(n[:-5] for n in os.listdir(d) if n.endswith(".lock")) if d.is_dir() else []


_V1_RUNNING_RE = re.compile(r"^(" + ID_RE.pattern[1:-1] + r")@([A-Za-z0-9-]+-\d+)\.(md|partial)$")


def parse_v1_running_name(name: str) -> tuple[str, str, str] | None:
    """(task id, owner, suffix) of a format-1 running/ name `ID@OWNER.md` (or its `.partial`)."""
    m = _V1_RUNNING_RE.match(name)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def format_path(sp: Spool) -> Path:
    """`.spoold/format`: the spool format's version, one line (`2`); written once, by init or a migration."""
    return sp.state_dir / "format"


def read_format(sp: Spool) -> int | None:
    """The spool's format version; None when no file says (a spool made by spoold 1)."""
    try:
        text = read_bytes(format_path(sp), 64).decode().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise SpoolError(f"{format_path(sp)} cannot be read ({e}); it should hold one line: {FORMAT}") from None
    if not text.isdigit():
        raise SpoolError(f"{format_path(sp)} says {text[:20]!r}; it should hold one line: {FORMAT}")
    return int(text)


WATCH_PROBE_PREFIX = ".watch-probe-"


def watch_probe_path(sp: Spool) -> Path:
    """`running/.watch-probe-OWNER`: a daemon touches it to learn that its watcher sees events."""
    return sp.dir("running") / f"{WATCH_PROBE_PREFIX}{owner_tag()}"


def is_watch_probe(name: str) -> bool:
    return name.startswith(WATCH_PROBE_PREFIX)


def is_task_file(name: str) -> bool:
    """A task file in a terminal directory: `ID.md`, not its `ID.result.md`."""
    return name.endswith(".md") and not name.endswith(".result.md")


def count_task_files(names: list[str]) -> int:
    """How many of a listing's names are tasks (is_task_file, and rejected entries), counted in C: `status` over
    100,000."""
    joined = "\n".join(names) + "\n"
    return joined.count(".md\n") - joined.count(".result.md\n") + joined.count(REJECTED_SUFFIX + "\n")


def newest_terminal(sp: Spool, state: str, n: int | None) -> list[tuple[str, Path]]:
    """(id, task file) of a terminal state's `n` most recently submitted tasks (all with None), by name alone."""
    named = [(tid, str(d), name) for d in terminal_dirs(sp, state) if d.is_dir() for name in os.listdir(d)
             if (tid := listed_id(name))]  # strings, not Paths: 100,000 Paths cost half a second
    picked = heapq.nlargest(n, named) if n is not None else named
    return [(tid, Path(d) / name) for tid, d, name in picked if ID_RE.match(tid)]


def terminal_task_files(sp: Spool, state: str, *, days: int | None = None, rejected: bool = False) -> Iterator[Path]:
    """Task files of a terminal state, newest partition first (`days`: only that many partitions); with
    `rejected`, the entries rejected as they were dropped (`ID.rejected`: never read or followed) too."""
    dirs = date_dirs(sp, state)
    for d in [*(dirs[:days] if days is not None else dirs), *([] if days is not None else [sp.dir(state)])]:
        for n in os.listdir(d) if d.is_dir() else []:
            if is_task_file(n) or (rejected and n.endswith(REJECTED_SUFFIX)):
                yield d / n


def partial_path(running: Path) -> Path:
    """`running/ID.N.STARTED@OWNER.partial`: a running task's answer so far, written only by its owner."""
    return running.with_suffix(PARTIAL_SUFFIX)


def find_partial(sp: Spool, task_id: str) -> Path | None:
    for e in list_running(sp):
        if e.task_id == task_id:
            p = partial_path(sp.dir("running") / e.name)
            return p if p.exists() else None
    return None


def locate(sp: Spool, task_id: str) -> Located:
    """Find a task by id in whichever state directory holds it.

    Lock-free: a task can move (queued → running, running → queued) between two
    listings and be missed by one pass, so a miss is looked for again before
    it counts.
    """
    check_id(task_id)
    for _ in range(3):
        found = _locate_once(sp, task_id)
        if found:
            return found
    raise TaskNotFound(f"no task {task_id} in {sp.root}")


def _locate_once(sp: Spool, task_id: str) -> Located | None:
    for e in list_running(sp):
        if e.task_id == task_id:
            return Located("running", sp.dir("running") / e.name, task_id)
    suffix = f".{task_id}.md"
    for name in os.listdir(sp.dir("queued")):
        if name.endswith(suffix):
            return Located("queued", sp.dir("queued") / name, task_id)
    return find_finished(sp, task_id)


def all_ids(sp: Spool) -> Iterator[str]:
    """Every task id in the spool, from names alone (running, queued, then the terminal states)."""
    yield from (e.task_id for e in list_running(sp))
    yield from (q.task_id for q in list_queued(sp))
    for state in TERMINAL:
        for d in terminal_dirs(sp, state):
            for name in os.listdir(d) if d.is_dir() else []:
                tid = listed_id(name)
                if tid and ID_RE.match(tid):
                    yield tid


LAST = "@last"


def resolve_id(sp: Spool, text: str) -> str:
    """The one task a person means: its full id, a prefix of it, its random part (`o5e4gy`), the name of
    the file it was dropped as (`sky.md`), or `@last` (the newest). Several matches are an error that
    lists them."""
    text = text.strip()
    if ID_RE.fullmatch(text):
        return locate(sp, text).task_id
    if text == LAST:
        newest = max(all_ids(sp), default=None)
        if newest is None:
            raise TaskNotFound(f"no tasks in {sp.root} yet")
        return newest
    stem = Path(text).stem if text.lower().endswith((".md", ".markdown", ".txt")) else text
    slug = slugify(stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]{2,120}", text) or not slug:
        raise BadTaskId(f"not a task id, a prefix of one or a file name: {text[:80]!r}")
    by_id = {i for i in all_ids(sp) if i.startswith(text) or i.split("-", 2)[1].startswith(text)}
    found = sorted(by_id or {i for i in all_ids(sp) if i.partition("-")[2].partition("-")[2] == slug})
    if not found:
        raise TaskNotFound(f"no task {text!r} in {sp.root} (an id, its first characters, a file name, or @last)")
    if len(found) > 1:
        shown = ", ".join(found[-5:]) + (f", and {len(found) - 5} more" if len(found) > 5 else "")
        raise BadTaskId(f"{text!r} names {len(found)} tasks ({shown}); give more of the id, or @last for the newest")
    return found[0]


def locate_in(sp: Spool, state: str, task_id: str) -> Located:
    """Where a task's file would be in a terminal state's directory (a failed/ one is not partitioned)."""
    return Located(state, task_path_for(sp.dir(state), task_id), task_id)


def find_queued(sp: Spool, task_id: str) -> Path | None:
    """The task's file in queued/, if it is there (a listing of queued/: for recovery, not per claim)."""
    suffix = f".{task_id}.md"
    return next((queued_path(sp, n) for n in os.listdir(sp.dir("queued")) if n.endswith(suffix)), None)


def find_finished(sp: Spool, task_id: str) -> Located | None:
    """The task's file in a terminal state, if another host (or an earlier attempt) finished it: a few stats."""
    for state in TERMINAL:
        for d in terminal_dirs(sp, state):
            p = task_path_for(d, task_id)
            if p.exists():
                return Located(state, p, task_id)
    rejected = rejected_path(sp, task_id, regular=False)
    if os.path.lexists(rejected):
        return Located("failed", rejected, task_id)
    return None


def find_result(sp: Spool, task_id: str) -> Path | None:
    """A result already written for a task, canonical or host-named (the task file may not have moved yet)."""
    hosts = known_hosts(sp)
    for state in TERMINAL:
        for d in terminal_dirs(sp, state):
            p = result_path_for(d, task_id)
            if p.exists():
                return p
            for host in hosts:
                if (p := host_result_path(d, task_id, host)).exists():
                    return p
    return None
