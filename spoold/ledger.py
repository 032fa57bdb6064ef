"""The rate-limit ledger: start history, spend, holds, and the start-time estimates built on them.

One JSON file per host under `.spoold/ledger/` (one writer per file, so a synced
spool never conflicts; the union of all hosts' files is the usage), read and
written only under an flock so admission and claim are one step.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import heapq
import json
import logging
import math
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from spoold import spool
from spoold.config import Settings
from spoold.spool import QueuedEntry, Spool
from spoold.units import FAMILY_WINDOWS, usd, window_words

log = logging.getLogger("spoold")
T = TypeVar("T")
E = TypeVar("E")
KEEP_DURATIONS = 20
DEFAULT_DURATION_S = 60.0
LOCK_TIMEOUT_S = 30.0


@dataclass
class WindowSeen:
    """The latest a task's run heard of one subscription window (from the CLI's rate_limit_event)."""

    status: str  # allowed, allowed_warning, rejected
    resets_at: float | None
    utilization: float | None  # 0-1; reported once a warning threshold is passed
    seen_at: float
    task_id: str | None = None

    def as_json(self) -> dict[str, object]:
        return {"status": self.status, "resets_at": self.resets_at, "utilization": self.utilization,
                "seen_at": self.seen_at, "task_id": self.task_id}


@dataclass
class HostLedger:
    """One host's own account: what it started, spent, and any hold it learned of."""

    starts: list[float] = field(default_factory=list)
    spend: dict[str, float] = field(default_factory=dict)  # UTC date -> USD
    durations: list[float] = field(default_factory=list)
    hold_until: float | None = None
    hold_reason: str | None = None
    hold_set_at: float | None = None
    holds_cleared_at: float | None = None  # lifts every host's hold set before it, without writing their files
    windows: dict[str, WindowSeen] = field(default_factory=dict)  # what the subscription said, per window
    hold_here: bool = False  # the hold is about this host (its CLI cannot run), not the account: it holds only it
    hold_person: bool = False  # only a person ends its cause: log in, add credit, install the CLI


@dataclass
class Usage:
    """The union of every host's ledger: what admission and estimates read."""

    starts: list[float]
    spend: dict[str, float]
    durations: list[float]
    hold_until: float | None
    hold_reason: str | None
    windows: dict[str, WindowSeen] = field(default_factory=dict)  # the newest word on each, from any host
    hold_person: bool = False  # the hold's cause is a person's to fix (not a limit that resets by itself)


ledger_dir = spool.ledger_dir


def host_file(sp: Spool) -> Path:
    return spool.ledger_host_file(sp, spool.owner_host(spool.owner_tag()))


@contextmanager
def locked(sp: Spool) -> Iterator[None]:
    """The ledger lock; an flock, so a killed holder releases it and nothing deadlocks.

    By hand, not filelock: a claim takes it once per task, and filelock 4 spends ~100 µs of Python on a
    take and release that are two syscalls here. It is the same flock on the same file, so it excludes
    any filelock.FileLock on it too. Our threads queue on `threads` first, so only processes poll. Where
    the filesystem has no flock, filelock takes over (it falls back to a lock file of its own)."""
    if not sp.local.threads.acquire(timeout=LOCK_TIMEOUT_S):
        raise TimeoutError(errno.ETIMEDOUT, "the ledger lock is held for over 30 s", str(spool.ledger_lock_path(sp)))
    try:
        with ExitStack() as held:
            fd = None
            if sp.local.ledger_lock != "filelock":
                try:
                    fd = _lock_ledger(sp)
                except OSError as e:
                    if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                        raise
                    sp.local.ledger_lock = "filelock"
            if fd is None:
                held.enter_context(_filelock(sp))
            else:
                held.callback(fcntl.flock, fd, fcntl.LOCK_UN)
            spool.fault("ledger:locked")
            yield
    finally:
        sp.local.threads.release()


def _filelock(sp: Spool) -> Any:
    import filelock  # lazy: a submit reads the ledger for its estimate but never locks it

    ledger_dir(sp).mkdir(mode=0o700, parents=True, exist_ok=True)
    return filelock.FileLock(spool.ledger_lock_path(sp), timeout=LOCK_TIMEOUT_S, thread_local=False, mode=0o600)


def _lock_ledger(sp: Spool) -> int:
    """Take the flock on the lock file, kept open between takes; one that was removed or replaced meanwhile
    (its inode is not the path's any more) is opened again, so every process locks the same file."""
    deadline, pause = time.monotonic() + LOCK_TIMEOUT_S, 0.001
    while True:
        if sp.local.ledger_lock is None:
            path = spool.ledger_lock_path(sp)
            ledger_dir(sp).mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            sp.local.ledger_lock = (fd, str(path), weakref.finalize(sp.local, os.close, fd))  # closed with its Spool
        fd, where, close = sp.local.ledger_lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(errno.ETIMEDOUT, "the ledger lock is held for over 30 s", where) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(where).st_ino
        except FileNotFoundError:
            same = False
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)  # (never left held behind an error: every other process would wait)
            raise
        if same:
            return fd
        fcntl.flock(fd, fcntl.LOCK_UN)
        close()
        sp.local.ledger_lock = None


def _load_host(sp: Spool, path: Path) -> HostLedger:
    """A host's file, parsed again only when its bytes changed: a claim reads every host's, and ours holds a
    start per task of the window. Comparing the bytes is exact where a stat is not (an inode reused within
    one timestamp tick by another process writing the same host's file)."""
    data = path.read_bytes()
    kept = sp.local.ledgers.get(str(path))
    if kept is not None and kept[0] == data:
        return _copy(kept[1])
    h = _parse_host(data)
    sp.local.ledgers[str(path)] = (data, _copy(h))
    return h


def _copy(h: HostLedger) -> HostLedger:
    """Callers change what they read; the kept parse must not change with it."""
    return replace(h, starts=list(h.starts), spend=dict(h.spend), durations=list(h.durations), windows=dict(h.windows))


def _parse_host(data: bytes) -> HostLedger:
    raw = json.loads(data.decode("utf-8"))
    if not isinstance(raw, dict):
        raise ValueError("not an object")
    return HostLedger(
        starts=[float(x) for x in raw.get("starts", [])],
        spend={str(k): float(v) for k, v in (raw.get("spend") or {}).items()},
        durations=[float(x) for x in raw.get("durations", [])],
        hold_until=float(raw["hold_until"]) if raw.get("hold_until") else None,
        hold_reason=raw.get("hold_reason"),
        hold_set_at=float(raw["hold_set_at"]) if raw.get("hold_set_at") else None,
        holds_cleared_at=float(raw["holds_cleared_at"]) if raw.get("holds_cleared_at") else None,
        windows={str(k): _window(v) for k, v in (raw.get("windows") or {}).items()},
        hold_here=raw.get("hold_here") is True,
        hold_person=raw.get("hold_person") is True,
    )


def _window(v: dict[str, object]) -> WindowSeen:
    num = lambda x: float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None
    return WindowSeen(str(v.get("status") or ""), num(v.get("resets_at")), num(v.get("utilization")),
                      num(v.get("seen_at")) or 0.0, str(v["task_id"]) if v.get("task_id") else None)


def _read_hosts(sp: Spool) -> dict[str, HostLedger]:
    """Every host's file by name. Our own damaged file is kept aside and rebuilt, never read as empty; another
    host's is never written here (one writer: a sync tool would make a conflict copy of it), so a damaged one
    counts, in memory, every start the spool's own files show, erring on the limit's side."""
    d = ledger_dir(sp)
    hosts: dict[str, HostLedger] = {}
    own = host_file(sp).name
    for name in sorted(os.listdir(d)) if d.is_dir() else []:
        if not name.endswith(".json") or not spool.HOST_ID_RE.match(name[:-5]):
            continue  # a sync tool's conflict copy or temp file is no host's account
        try:
            hosts[name] = _load_host(sp, d / name)
        except FileNotFoundError:
            continue  # removed (or replaced by a sync tool) since the listing
        except (OSError, ValueError, TypeError, KeyError) as e:
            if name == own:
                hosts[name] = _rebuild(sp, d / name, e)
            else:
                log.warning("ledger %s of another host is unreadable (%s); counting every start the spool shows", name, e)
                hosts[name] = HostLedger(starts=started_stamps(sp))
    return hosts


def _cleared_at(hosts: dict[str, HostLedger]) -> float:
    """When a person last lifted every hold (`spoold config --clear-hold`, on any host): holds set before it end."""
    return max((h.holds_cleared_at or 0.0 for h in hosts.values()), default=0.0)


def read_usage(sp: Spool, now: float | None = None, hosts: dict[str, HostLedger] | None = None) -> Usage:
    """All hosts' ledgers joined: what admission and estimates read."""
    now = time.time() if now is None else now
    hosts_ = list((hosts if hosts is not None else _read_hosts(sp)).items())
    starts: list[float] = []
    spend: dict[str, float] = {}
    durations: list[float] = []
    hold_until, hold_reason, hold_person = None, None, False
    windows: dict[str, WindowSeen] = {}
    cleared = _cleared_at(dict(hosts_))
    own = host_file(sp).name
    for name, h in hosts_:
        starts += h.starts
        for day, amount in h.spend.items():
            spend[day] = spend.get(day, 0.0) + amount
        durations += h.durations
        live = (h.hold_until is not None and h.hold_until > now and (h.hold_set_at or 0.0) > cleared
                and (name == own or not h.hold_here))  # another host's missing CLI holds that host alone
        if live and h.hold_until is not None and (hold_until is None or h.hold_until > hold_until):
            hold_until, hold_reason, hold_person = h.hold_until, h.hold_reason, h.hold_person
        for name, w in h.windows.items():
            if (w.resets_at is None or w.resets_at > now) and (name not in windows or w.seen_at > windows[name].seen_at):
                windows[name] = w
    return Usage(sorted(starts), spend, durations[-KEEP_DURATIONS:], hold_until, hold_reason, windows, hold_person)


def _rebuild(sp: Spool, path: Path, err: Exception) -> HostLedger:
    """Keep the damaged ledger aside and rebuild starts from the tasks' own `started_at` stamps."""
    aside = spool.damaged_path(path, time.time())
    try:
        os.rename(path, aside)
        log.error("ledger %s was damaged (%s); kept as %s, rebuilt from task files", path.name, err, aside.name)
    except OSError:
        pass
    h = HostLedger(starts=started_stamps(sp))
    _write_host(sp, path, h)
    return h


def started_stamps(sp: Spool, since_days: int = 2) -> list[float]:
    """Recent starts, from what the spool says: running/ names, the records of requeued attempts, and the
    results in the newest done/ partitions and failed/."""
    from spoold.task import parse_result  # local: only a damaged ledger needs it

    out = [e.started.timestamp() for e in spool.list_running(sp)]
    def hosts() -> list[str]:
        return spool.known_hosts(sp)

    results = [r for state, days in (("done", since_days), ("failed", None))
               for p in spool.terminal_task_files(sp, state, days=days) for r in spool.results_of(p.parent, p.stem, hosts)]
    for p in results:
        try:
            started = parse_result(spool.read_bytes(p).decode("utf-8")).started_at
        except Exception:
            continue
        if started is not None:
            out.append(started.timestamp())
    root = spool.attempts_root(sp)
    for task_id in os.listdir(root) if root.is_dir() else []:
        for r in spool.attempt_records(sp, task_id) if spool.ID_RE.match(task_id) else []:
            if r.kind != "retried":  # a `waited` one may not have counted: counting it errs on the limit's side
                try:
                    out.append(datetime.fromisoformat(json.loads(spool.read_bytes(r.path))["started_at"]).timestamp())
                except (OSError, ValueError, KeyError, TypeError):
                    continue
    return sorted(out)


def _write_host(sp: Spool, path: Path, h: HostLedger) -> None:
    rest = {"spend": h.spend, "hold_until": h.hold_until, "hold_reason": h.hold_reason, "hold_set_at": h.hold_set_at,
            "holds_cleared_at": h.holds_cleared_at, "windows": {k: w.as_json() for k, w in h.windows.items()},
            **({"hold_here": True} if h.hold_here else {}), **({"hold_person": True} if h.hold_person else {})}
    data = (f'{{"starts":{_floats_json(sp, h.starts)},"durations":{_floats_json(sp, h.durations, "durations")},'
            f'{json.dumps(rest, separators=(",", ":"))[1:]}')  # no indent: C encoder, 10x faster
    raw = data.encode()
    spool.rewrite(sp, path, raw)
    sp.local.ledgers[str(path)] = (raw, _copy(h))  # what we just wrote needs no parse at the next read


def _floats_json(sp: Spool, xs: list[float], name: str = "starts") -> str:
    """A JSON array of floats, as json.dumps writes it, from the texts of the last array written under `name`
    where it is that one with a few pruned from its front and a few added at its end (a claim's starts):
    rewriting every float of the window at each claim made its cost grow with the window."""
    last_xs, last_texts = sp.local.floats.get(name, ([], []))
    k = bisect.bisect_left(last_xs, xs[0]) if xs and last_xs else len(last_xs)
    keep = len(last_xs) - k
    if not (keep <= len(xs) and xs[:keep] == last_xs[k:]) or 0.0 in xs[:keep]:  # (-0.0 == 0.0)
        keep, texts = 0, []
    else:
        texts = last_texts[k:]
    texts += [repr(float(x)) if math.isfinite(x) else json.dumps(x) for x in xs[keep:]]
    sp.local.floats[name] = (list(xs), texts)
    return f"[{','.join(texts)}]"


def _update_own(
    sp: Spool, change: Callable[[HostLedger], None], settings: Settings, now: float, h: HostLedger | None = None
) -> None:
    """Read-modify-write this host's file (caller holds the lock), pruned to what the windows need.

    `h` is the file as the caller just read it under the same lock, to spare a second parse.
    """
    path = host_file(sp)
    if h is None:
        try:
            h = _load_host(sp, path)
        except FileNotFoundError:
            h = HostLedger()
        except (OSError, ValueError, TypeError, KeyError) as e:
            h = _rebuild(sp, path, e)
    change(h)
    with sp.local.unsaved_lock:
        h.durations += sp.local.unsaved
        sp.local.unsaved.clear()
    horizon = now - settings.window_minutes * 60 - max(settings.min_interval_s, 0)
    h.starts = [t for t in h.starts if t > horizon]
    month_start = _month_start(now).strftime("%Y-%m-%d")
    h.spend = {d: v for d, v in h.spend.items() if d >= month_start}
    h.durations = h.durations[-KEEP_DURATIONS:]
    if h.hold_until and h.hold_until <= now:
        _drop_hold(h)
    h.windows = {k: w for k, w in h.windows.items() if w.resets_at is None or w.resets_at > now}
    _write_host(sp, path, h)


def _month_start(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


# ---- admission -------------------------------------------------------------------


@dataclass
class Gate:
    """Whether the next start must wait (a reason), and until when: `wait_until` is None when it may start
    now, and also while it waits for a running task to end (concurrency), which has no time."""

    wait_until: float | None
    reason: str | None
    held: bool = False  # by a hold (usage limit, login, budget, reserve), not by the pace of the limit itself

    @property
    def waits(self) -> bool:
        return self.reason is not None


def in_window(starts: list[float], settings: Settings, now: float) -> list[float]:
    """Starts that still count. A start 'in the future' (the clock went back) counts as now."""
    s = sorted(starts)  # in C, and linear for the sorted lists it is given: a gate runs per claim
    win = s[bisect.bisect_right(s, now - settings.window_minutes * 60):]
    if win and win[-1] > now:
        win = [min(t, now) for t in win]
    return win


def share(settings: Settings, members: int) -> int:
    """A host's part of the limit in strict mode: N / live hosts, at least 1 (the union is checked too)."""
    return max(1, settings.max_requests // max(1, members))


def gate(usage: Usage, settings: Settings, running: int, now: float, *, own: list[float] | None = None,
         members: int = 1) -> Gate:
    """The earliest time the next start is allowed, combining every rule. `own` (strict mode on a synced
    spool with `members` live hosts): this host's own starts, held to its share of the limit."""
    holds: list[tuple[float, str]] = []
    if usage.hold_until and usage.hold_until > now:
        holds.append((usage.hold_until, usage.hold_reason or "held"))
    for hold in (budget_hold(usage, settings, now), reserve_hold(usage, settings, now)):
        if hold:
            holds.append(hold)
    waits = list(holds)
    win = in_window(usage.starts, settings, now)
    if len(win) >= settings.max_requests:
        t = win[-settings.max_requests] + settings.window_minutes * 60
        waits.append((t, f"rate limit: {settings.max_requests} starts per {settings.window_minutes:g} min"))
    if own is not None and settings.limit_mode == "strict" and members > 1:
        mine, part = in_window(own, settings, now), share(settings, members)
        if len(mine) >= part:
            t = mine[-part] + settings.window_minutes * 60
            waits.append((t, f"strict limit: this host's share is {part} of {settings.max_requests} starts "
                             f"per {settings.window_minutes:g} min ({members} hosts)"))
    if settings.min_interval_s and win:
        t = win[-1] + settings.min_interval_s
        if t > now:
            waits.append((t, f"min_interval {settings.min_interval_s:g} s between starts"))
    if running >= settings.concurrency:
        return Gate(None, f"concurrency {settings.concurrency}: waiting for a running task")
    if not waits:
        return Gate(None, None)
    t, reason = max(waits)
    return Gate(t, reason, (t, reason) in holds) if t > now else Gate(None, None)


def budget_hold(usage: Usage, settings: Settings, now: float) -> tuple[float, str] | None:
    today = datetime.fromtimestamp(now, UTC)
    if settings.budget_day_usd is not None:
        spent = usage.spend.get(today.strftime("%Y-%m-%d"), 0.0)
        if spent >= settings.budget_day_usd:
            end = (today + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
            return end.timestamp(), f"daily budget of {usd(settings.budget_day_usd)} reached ({usd(spent)} spent today)"
    if settings.budget_month_usd is not None:
        ms = _month_start(now)
        spent = sum(v for d, v in usage.spend.items() if d >= ms.strftime("%Y-%m-%d"))
        if spent >= settings.budget_month_usd:
            end = (ms + timedelta(days=32)).replace(day=1)
            return end.timestamp(), (f"monthly budget of {usd(settings.budget_month_usd)} reached "
                                     f"({usd(spent)} spent this month)")
    return None


def reserve_holds(usage: Usage, settings: Settings, now: float) -> dict[str | None, tuple[float, str]]:
    """Windows that stop starts until they reset, keyed by the model family they bind (`seven_day_opus`
    holds opus tasks only), None for the windows that bind every task (5-hour, weekly).

    A family's window the subscription rejected holds that family; with a reserve set, so does any window
    whose reported use has eaten into it, so a queue never takes the share kept for the user's own use.
    """
    holds: dict[str | None, tuple[float, str]] = {}
    for name, w in usage.windows.items():
        if w.resets_at is None or w.resets_at <= now:
            continue
        family = FAMILY_WINDOWS.get(name)
        if w.status == "rejected" and family is not None:
            why = f"the subscription's {window_words(name)} limit is reached"
        elif settings.reserve is not None and w.utilization is not None and w.utilization >= 1 - settings.reserve:
            why = (f"reserve: the {window_words(name)} window is {w.utilization:.0%} used (starts stop at "
                   f"{1 - settings.reserve:.0%}, keeping {settings.reserve:.0%} for you)")
        else:
            continue
        if family not in holds or w.resets_at > holds[family][0]:
            holds[family] = (w.resets_at, why)
    return holds


def reserve_hold(usage: Usage, settings: Settings, now: float) -> tuple[float, str] | None:
    """The reserve hold on every task (a family's own window holds only that family: see reserve_holds)."""
    return reserve_holds(usage, settings, now).get(None)


def start_many(
    sp: Spool, settings: Settings, candidates: Iterable[E], claim: Callable[[E, float], T | None], want: int,
    *, now: Callable[[], float] = time.time, finishing: frozenset[str] = frozenset(),
    undo: Callable[[list[T]], None] | None = None, members: int = 1,
) -> tuple[list[T], Gate]:
    """Admit and claim up to `want` candidates in order, under one lock and with one ledger write.

    Each start is gated as if the ones before it in the batch were already counted. Stops at
    the first gate that says wait (returned), or when the candidates run out. `finishing` are
    ids of our running/ files whose process has already exited: they hold no concurrency slot. Concurrency
    is this host's (other hosts' running/ files, synced here, use their machines); in strict mode the limit
    is shared by the `members` live hosts and any other host that started a task in the window (so a host
    that looks silent for a moment keeps its share, and the shares never add up past the limit).
    If the starts cannot be written (a full disk), `undo` gets the claims back before the error is raised.
    """
    out: list[T] = []
    with locked(sp):
        t = now()
        hosts = _read_hosts(sp)
        usage = read_usage(sp, t, hosts)
        if usage.starts and usage.starts[-1] > t:  # the clock went back: our starts 'in the future' count from now
            _update_own(sp, lambda h: setattr(h, "starts", [min(x, t) for x in h.starts]), settings, t)
            hosts = _read_hosts(sp)
            usage = read_usage(sp, t, hosts)
        here = spool.owner_host(spool.owner_tag())
        running = sum(1 for e in spool.list_running(sp) if e.host == here and e.task_id not in finishing)
        own_ledger = hosts.get(host_file(sp).name)
        own = list(own_ledger.starts) if own_ledger else []
        if settings.limit_mode == "strict":  # a host that started in this window still holds its share
            members = max(members, sum(1 for h in hosts.values() if in_window(h.starts, settings, t)))
        g = Gate(None, None)
        try:
            for c in candidates:
                g = gate(usage, settings, running + len(out), t, own=own, members=members)
                if g.waits:
                    break
                claimed = claim(c, t)
                if claimed is not None:
                    out.append(claimed)
                    usage.starts.append(t)
                    own.append(t)
                    if len(out) >= want:
                        break
        except OSError:
            if not out:
                raise
            log.warning("a claim failed after %d succeeded in the same batch; they start, the rest waits", len(out))
        if out:
            try:
                _update_own(sp, lambda h: h.starts.extend([t] * len(out)), settings, t, hosts.get(host_file(sp).name))
            except OSError:
                if undo is not None:  # starts that cannot be counted must not run: the limit holds first
                    undo(out)
                raise
    return out, g


def _locked_update(sp: Spool, settings: Settings, change: Callable[[HostLedger, float], None]) -> None:
    """Change our own file under the lock, with the time read under the lock.

    A time read before waiting for the lock would be older than starts other
    processes recorded meanwhile, and pruning against it would misplace them.
    """
    with locked(sp):
        t = time.time()
        _update_own(sp, lambda h: change(h, t), settings, t)


def record_finish(sp: Spool, settings: Settings, cost_usd: float | None, duration_s: float | None,
                  windows: dict[str, WindowSeen] | None = None) -> None:
    """Count a finished run. Spend and what the subscription said are written at once (budgets and the
    reserve must hold across a crash and for every daemon); a run time alone only feeds estimates, so it
    rides along with this host's next ledger write (or `flush`)."""
    if not cost_usd and not windows:
        if duration_s is not None:
            with sp.local.unsaved_lock:
                sp.local.unsaved.append(round(duration_s, 3))
        return

    def change(h: HostLedger, t: float) -> None:
        day = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")
        if cost_usd:
            h.spend[day] = h.spend.get(day, 0.0) + cost_usd
        if duration_s is not None:
            h.durations.append(round(duration_s, 3))
        h.windows.update(windows or {})

    _locked_update(sp, settings, change)


def flush(sp: Spool, settings: Settings) -> None:
    """Write run times still held in memory (the daemon does it when a turn starts nothing, and at exit)."""
    if sp.local.unsaved:
        _locked_update(sp, settings, lambda h, t: None)


def forget_start(sp: Spool, settings: Settings, started: float) -> None:
    """Give back the start a claim took when the task never reached the CLI (it waits, or the CLI cannot run):
    a follow-up that waits, or a missing CLI, must not use up the window's starts."""

    def change(h: HostLedger, t: float) -> None:
        near = [i for i, s in enumerate(h.starts) if abs(s - started) < 0.01]
        if near:
            del h.starts[near[0]]

    _locked_update(sp, settings, change)


def set_hold(sp: Spool, settings: Settings, until: float, reason: str,
             windows: dict[str, WindowSeen] | None = None, *, this_host: bool = False, person: bool = False) -> None:
    """Hold all dispatch (every process reads it) until `until`; `this_host`: a hold about this machine (its
    CLI cannot run), which holds this host's daemons alone; `person`: its cause is a person's to fix.

    A hold of this host alone never replaces a live hold of every host in the same file: that one holds this
    host too, and the other hosts must keep seeing it (it comes back, if the CLI still cannot run, once it ends).
    """

    def change(h: HostLedger, t: float) -> None:
        if not (this_host and h.hold_until is not None and h.hold_until > t and not h.hold_here
                and (h.hold_set_at or 0.0) > _cleared_at(_read_hosts(sp))):
            h.hold_until, h.hold_reason, h.hold_set_at, h.hold_here, h.hold_person = until, reason, t, this_host, person
        h.windows.update(windows or {})

    _locked_update(sp, settings, change)


def clear_host_hold(sp: Spool, settings: Settings) -> bool:
    """Lift this host's hold about its own CLI (a daemon started with one that works); True if there was one.
    Read first: a daemon's start writes the ledger only when there is such a hold."""
    own = _read_hosts(sp).get(host_file(sp).name)
    if own is None or not own.hold_here or own.hold_until is None:
        return False
    lifted = [False]

    def change(h: HostLedger, t: float) -> None:
        if h.hold_here and h.hold_until is not None:
            _drop_hold(h)
            lifted[0] = True

    _locked_update(sp, settings, change)
    return lifted[0]


def _drop_hold(h: HostLedger) -> None:
    h.hold_until, h.hold_reason, h.hold_set_at, h.hold_here, h.hold_person = None, None, None, False, False


def clear_hold(sp: Spool, settings: Settings) -> None:
    """Lift every host's current hold by stamping our own file (other hosts' files stay theirs)."""
    _locked_update(sp, settings, lambda h, t: setattr(h, "holds_cleared_at", t))


# ---- order and estimates ---------------------------------------------------------


def dispatch_order(entries: Sequence[QueuedEntry], strategy: str) -> Sequence[QueuedEntry]:
    """Names already sort by priority, not_before, submission; fifo/lifo re-sort by submission only."""
    if strategy in ("fifo", "lifo") and isinstance(entries, spool.QueuedListing):
        return entries.by_id(reverse=strategy == "lifo")  # from names: a deep queue is not parsed
    if strategy == "fifo":
        return sorted(entries, key=lambda e: e.task_id)
    if strategy == "lifo":
        return sorted(entries, key=lambda e: e.task_id, reverse=True)
    return entries


def next_eligible(entries: Sequence[QueuedEntry], now: float) -> QueuedEntry | None:
    for e in entries:
        if e.not_before is None or e.not_before.timestamp() <= now:
            return e
    return None


def typical_duration(usage: Usage) -> float:
    """The median of recent run times: stable against one outlier."""
    if not usage.durations:
        return DEFAULT_DURATION_S
    d = sorted(usage.durations)
    return d[len(d) // 2]


def _simulation_start(sp: Spool, settings: Settings, usage: Usage, now: float
                      ) -> tuple[float, list[float], list[float], float]:
    """What an estimate starts from: the earliest any start may be, when each worker frees up (a heap),
    the starts in the window, and the typical run time."""
    dur = typical_duration(usage)
    starts = in_window(usage.starts, settings, now)
    running_started = [e.started.timestamp() for e in spool.list_running(sp)]
    # a running task ends a typical duration after its start, or, once past that, after as long again as it ran
    workers = sorted(max(now, t + dur, now + (now - t)) for t in running_started)[: settings.concurrency]
    workers += [now] * (settings.concurrency - len(workers))
    floor = now
    if usage.hold_until and usage.hold_until > now:
        floor = usage.hold_until
    for hold in (budget_hold(usage, settings, now), reserve_hold(usage, settings, now)):
        if hold:
            floor = max(floor, hold[0])
    heapq.heapify(workers)
    return floor, workers, starts, dur


def nth_start(sp: Spool, settings: Settings, position: int, *, now: float | None = None,
              usage: Usage | None = None) -> float:
    """When the task at `position` (1-based) starts, if none of the tasks up to it has a not_before: the
    same rules as `estimate`, without a list of the tasks (a submit behind 100,000 knows its place from
    the queue's counts alone)."""
    now = time.time() if now is None else now
    usage = usage or read_usage(sp, now)
    floor, workers, starts, dur = _simulation_start(sp, settings, usage, now)
    return untimed_start(position, floor, workers, starts, dur, settings.concurrency, settings.max_requests,
                         settings.window_minutes * 60, settings.min_interval_s)


def _earliest(floor: float, workers: list[float], starts: list[float], n: int, w: float, gap: float) -> float:
    """The next start the rules allow: a free worker (the heap's first), the window (the start n places
    back, plus w), the spacing after the last start, and the floor (holds)."""
    t = max(floor, workers[0])
    if len(starts) >= n:
        t = max(t, starts[-n] + w)
    if gap and starts:
        t = max(t, starts[-1] + gap)
    return t


def untimed_start(position: int, floor: float, workers: list[float], starts: list[float], dur: float, c: int,
                  n: int, w: float, gap: float, *, jump: bool = True) -> float:
    """The start of the `position`-th of tasks that are all free to start, by the rules' recurrence

        t_k = max(floor, t_(k-c) + dur, t_(k-n) + w, t_(k-1) + gap)

    (workers, window, spacing; the first terms from the running tasks and the window's starts). It is
    max-plus linear, so it becomes periodic: after a transient, every P starts take P x lambda, lambda
    the slowest of dur/c, w/n and gap. Simulated until that shows, then extended in one step, exactly
    (`jump=False` walks every start: what the tests hold the jump to)."""
    workers, starts = list(workers), list(starts)
    # The window waits only for a start n places after another. The first such new start is number
    # n - len(starts), and the workers and the spacing alone put it at least that many cycles after
    # now; if those reach past w, every start n places back (one already made is before now) is
    # more than w earlier, and the window never waits: its long memory need not be followed.
    reach = n - len(starts)
    window_binds = len(starts) + position > n and not (reach > 0 and max(reach // c * dur, reach * gap) >= w)
    rates = [(c, dur / c)] + ([(n, w / n)] if window_binds else []) + ([(1, gap)] if gap else [])
    lam = max(r for _, r in rates)
    period = min(p for p, r in rates if r == lam)  # the critical cycle's length
    span = max(p for p, _ in rates)
    enough = 3 * span + 2 * period + 16  # a transient is a few times the longest term; checked, not assumed
    first = len(starts)
    t = floor
    for k in range(position):
        t = _earliest(floor, workers, starts, n, w, gap)
        starts.append(t)
        heapq.heapreplace(workers, t + dur)
        done = k + 1
        if jump and done >= enough and done % period == 0 and done < position:
            step = period * lam
            if all(abs(starts[-1 - i] - starts[-1 - i - period] - step) <= 1e-6 * max(1.0, step) for i in range(span)):
                last = done - period  # the first of the last period new starts, counted from 0
                j = last + (position - 1 - last) % period
                return starts[first + j] + (position - 1 - j) // period * step
    return t


@dataclass
class Estimate:
    task_id: str
    position: int
    start: float  # epoch seconds


def estimate(
    sp: Spool, settings: Settings, entries: Sequence[QueuedEntry] | None = None, *, limit: int | None = None,
    now: float | None = None, usage: Usage | None = None,
) -> list[Estimate]:
    """When each queued task (in dispatch order) should start, by simulating the rules forward.

    The k-th start under N per W is at least the start N places earlier plus W;
    workers free up a typical duration after their task started; holds and
    not_before push a start later.
    """
    now = time.time() if now is None else now
    usage = usage or read_usage(sp, now)
    full = dispatch_order(entries if entries is not None else spool.list_queued(sp), settings.strategy)
    ids = full.untimed_ids(limit) if isinstance(full, spool.QueuedListing) else None
    floor, workers, starts, dur = _simulation_start(sp, settings, usage, now)
    n, w, gap = settings.max_requests, settings.window_minutes * 60, settings.min_interval_s
    if ids is not None:  # no not_before among them (from the names alone): every task is next in line
        pending: deque[tuple[int, str, float | None]] = deque((pos, i, None) for pos, i in enumerate(ids, 1))
    else:
        pending = deque((pos, e.task_id, e.not_before.timestamp() if e.not_before else None)
                        for pos, e in enumerate(full[:limit] if limit is not None else full, 1))
    out: list[Estimate] = []
    while pending:
        t = _earliest(floor, workers, starts, n, w, gap)
        head = pending[0][2]  # the usual case, first in line and free to start, without a scan
        pick = 0 if head is None or head <= t else next((i for i, p in enumerate(pending) if p[2] is None or p[2] <= t),
                                                        None)
        if pick is None:  # everyone left waits for a not_before: jump to the earliest
            t = min(p[2] for p in pending if p[2] is not None)
            pick = next(i for i, p in enumerate(pending) if p[2] is not None and p[2] <= t)
        pos, task_id, _ = pending[pick]
        del pending[pick]
        out.append(Estimate(task_id, pos, t))
        starts.append(t)
        heapq.heapreplace(workers, t + dur)
    return out


